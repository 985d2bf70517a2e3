#!/bin/bash
# make-keys.sh OUTDIR: the OS-signing PKI for RAUC bundles, made with openssl.
#   OUTDIR/ca.pem, ca.key         the CA: ca.pem is the keyring every appliance carries (/etc/rauc/keyring.pem)
#   OUTDIR/signing.pem, .key      the certificate image/rauc/build-bundle.sh signs bundles with
# Keep ca.key offline; the signing key can be rotated (a new one signed by the CA) without touching the fleet.
# Keys are ECDSA P-256; private keys are written mode 600 and never overwritten.
set -euo pipefail
OUT=${1:?usage: make-keys.sh OUTDIR}
CA_DAYS=${CA_DAYS:-7300}
SIGN_DAYS=${SIGN_DAYS:-1825}
ORG=${ORG:-StoreLink}
mkdir -p "$OUT"
umask 077
for f in ca.key signing.key; do
    [[ ! -e $OUT/$f ]] || { echo "$OUT/$f exists: refusing to overwrite a key" >&2; exit 1; }
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$OUT/ca.key" \
    -out "$OUT/ca.pem" -days "$CA_DAYS" -subj "/O=$ORG/CN=$ORG OS update CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$OUT/signing.key" \
    -out "$OUT/signing.csr" -subj "/O=$ORG/CN=$ORG OS bundle signing" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext" "$OUT/signing.csr" "$OUT/ca.srl"' EXIT
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n' >"$ext"
openssl x509 -req -in "$OUT/signing.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -CAcreateserial \
    -out "$OUT/signing.pem" -days "$SIGN_DAYS" -extfile "$ext" 2>/dev/null
chmod 644 "$OUT/ca.pem" "$OUT/signing.pem"
echo "keyring: $OUT/ca.pem; signing certificate: $OUT/signing.pem (key $OUT/signing.key)"
