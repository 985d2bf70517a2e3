"""Head office's side: the `storelink hq` commands (storelink.hq.cli assembles them).

config.py: hq.toml; connect.py: the MQTT connection every command uses; prices.py: keygen, publish-prices,
status; batch.py: signed price batches; remote.py: push-config, cmd; pki.py and enroll.py: the store CA,
enrolment and revocation; broker_config.py: the broker's TLS listener and ACL; release.py and rollout.py:
building, publishing and following software releases; fleet_cli.py: ingest and serve (head office's event store,
price compliance and fleet view: ingest.py, tracker.py, dashboard.py and the rest).
"""
