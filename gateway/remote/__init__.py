"""Remote control from head office: signed config (desired/reported), signed commands, the signature envelope."""
