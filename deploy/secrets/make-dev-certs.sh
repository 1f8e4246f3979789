#!/usr/bin/env sh
# Development TLS material and API keys for mmserve: a throw-away CA, one certificate for both services, and one
# random API key per service. For docker-compose.tls.yml (which reads this directory) and for a test cluster
# (deploy/k8s/README.md). Production: certificates from your CA or cert-manager, keys from your secret store.
#
#   deploy/secrets/make-dev-certs.sh [OUT_DIR [NAMESPACE]]    [defaults: this directory, "default"]
#
# Writes to OUT_DIR: ca.crt ca.key tls.crt tls.key encoder-api-keys generator-api-keys (existing files are kept:
# delete them to start over). The certificate is valid for server and client use (the generator presents it to
# an encoder with mutual TLS) and names, as subjectAltNames:
#   localhost, 127.0.0.1     host clients, and the healthchecks and probes, which connect over loopback
#   encoder, generator       the compose service names
#   mmserve-encoder.NAMESPACE.svc.cluster.local, mmserve-generator[.NAMESPACE.svc[.cluster.local]]   Kubernetes
set -eu

out=${1:-$(dirname "$0")}
namespace=${2:-default}
days=825
mkdir -p "$out"
cd "$out"

if [ ! -f ca.crt ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" -subj "/CN=mmserve development CA" \
        -keyout ca.key -out ca.crt \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

if [ ! -f tls.crt ]; then
    svc="svc.cluster.local"
    sans="DNS:localhost,IP:127.0.0.1,DNS:encoder,DNS:generator"
    sans="$sans,DNS:mmserve-encoder.$namespace.$svc,DNS:mmserve-generator,DNS:mmserve-generator.$namespace.svc"
    sans="$sans,DNS:mmserve-generator.$namespace.$svc"
    extensions=$(mktemp)
    trap 'rm -f "$extensions" tls.csr' EXIT
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$sans" > "$extensions"
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=mmserve" -keyout tls.key -out tls.csr 2>/dev/null
    openssl x509 -req -sha256 -days "$days" -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -extfile "$extensions" -out tls.crt 2>/dev/null
    rm -f ca.srl
fi

for service in encoder generator; do
    if [ ! -f "$service-api-keys" ]; then
        printf '# keys the %s accepts, one per line\n%s\n' "$service" "$(openssl rand -hex 32)" > "$service-api-keys"
    fi
done

# Readable by the containers' user (uid 10001): docker compose mounts secret files with their host permissions.
# Development material only; ca.key stays private to you.
chmod 0644 ca.crt tls.crt tls.key encoder-api-keys generator-api-keys
chmod 0600 ca.key
echo "wrote $(pwd): ca.crt tls.crt tls.key encoder-api-keys generator-api-keys (SANs for namespace $namespace)"
