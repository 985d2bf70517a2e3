"""Kiosk customer sessions (erased when the customer steps off the mat) and the online cart printed in store."""
