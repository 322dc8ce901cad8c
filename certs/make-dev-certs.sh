#!/usr/bin/env bash
# Makes a development CA, a server certificate and a client certificate in
# this folder, for trying qbproxy's TLS and mTLS by hand. Not for production.
#
#   certs/make-dev-certs.sh [server-name]     (default: localhost)
#
# Files (git-ignored): ca.pem ca.key, server.pem server.key, client.pem client.key
set -euo pipefail
cd "$(dirname "$0")"
name=${1:-localhost}
days=825

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=qbproxy development CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() { # role name extensions
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
        -keyout "$1.key" -out "$1.csr" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
        -out "$1.pem" -extfile <(printf '%s\n' "$3") 2>/dev/null
    rm -f "$1.csr"
}
issue server "$name" "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue client "qbproxy development client" "extendedKeyUsage=clientAuth"
chmod 600 ./*.key

cat <<TXT
Made in $(pwd):
  ca.pem ca.key          the development CA
  server.pem server.key  for $name, localhost and 127.0.0.1
  client.pem client.key  a client certificate signed by the CA

In config.toml:
  [listen]
  tls_cert = "$(pwd)/server.pem"
  tls_key = "$(pwd)/server.key"
  client_ca = "$(pwd)/ca.pem"      # require client certificates (mTLS)

Then:
  curl --cacert certs/ca.pem --cert certs/client.pem --key certs/client.key https://localhost:8080/users.json
TXT
