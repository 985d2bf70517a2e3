"""A throwaway CA, broker certificate and client certificate for TLS tests, issued by the store CA head office uses
(storelink.hq.pki), so the tests' certificates are the ones a fleet really gets."""

from __future__ import annotations

from pathlib import Path

from storelink.hq.pki import StoreCA, write_secret


def make_pki(d: Path, client: str = "store-0042") -> dict[str, Path]:
    ca = StoreCA.create(d / "store-ca", days=1)
    out = {"ca": ca.cert_path}
    for role, issued in (("server", ca.issue_server(["localhost", "127.0.0.1"], days=1)),
                         ("client", ca.issue_client(client, role="store", days=1))):
        out[f"{role}_cert"] = d / f"{role}.pem"
        out[f"{role}_cert"].write_bytes(issued.cert_pem)
        out[f"{role}_key"] = d / f"{role}.key"
        write_secret(out[f"{role}_key"], issued.key_pem)
    return out
