#!/usr/bin/env bash
# Installs everything the agentgate test environment needs on a fresh Debian machine:
# Debian packages (PostgreSQL, OpenSSH, libclang for pg_query) and the binaries built from
# the Go module proxy (etcd, kube-apiserver, kubectl, helm).
#
# Built binaries are cached outside the repository, keyed by version:
#   ${AGENTGATE_CACHE:-$HOME/.cache/agentgate}/<component>-<version>/<binary>
# A second run finds them and returns in seconds.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${AGENTGATE_CACHE:-$HOME/.cache/agentgate}"
K8S_VERSION="$(sed -n 's/^require k8s.io\/kubernetes v\(.*\)$/\1/p' "$HERE/k8s/go.mod")"
ETCD_VERSION="$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 v\(.*\)$/\1/p' "$HERE/etcd/go.mod")"
HELM_VERSION="$(sed -n 's/^require helm.sh\/helm\/v3 v\(.*\)$/\1/p' "$HERE/helm/go.mod")"
# Keycloak, the OIDC provider users run, from Maven Central (the Quarkus distribution).
KEYCLOAK_VERSION=26.4.7
# The PostgreSQL JDBC driver, for the gateway's client tests (Maven Central).
PGJDBC_VERSION=42.7.14

log() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

DEBS=(postgresql postgresql-client openssh-server openssh-client libclang-dev clang pkg-config openssl pgbouncer python3-psycopg curl)

install_debs() {
  local missing=()
  for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "Debian packages present"
  fi
}

install_rust_components() {
  local have
  have="$(rustup component list --installed 2>/dev/null || true)"
  for c in rustfmt clippy; do
    if ! grep -q "^$c" <<<"$have"; then
      log "rustup component add $c"
      rustup component add "$c"
    fi
  done
}

# go_build <module dir> <package> <output> [ldflags]
go_build() {
  local dir="$1" pkg="$2" out="$3" ldflags="${4:-}"
  if [[ -x "$out" ]]; then
    log "cached: $out"
    return
  fi
  log "building $pkg -> $out (cold: several minutes)"
  mkdir -p "$(dirname "$out")"
  (cd "$dir" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod \
    go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
}

build_go() {
  go_build "$HERE/etcd" go.etcd.io/etcd/server/v3 "$CACHE/etcd-$ETCD_VERSION/etcd"
  local minor="${K8S_VERSION#*.}"; minor="${minor%%.*}"
  local kflags="-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  go_build "$HERE/k8s" k8s.io/kubernetes/cmd/kube-apiserver "$CACHE/kubernetes-$K8S_VERSION/kube-apiserver" "$kflags"
  go_build "$HERE/k8s" k8s.io/kubernetes/cmd/kubectl "$CACHE/kubernetes-$K8S_VERSION/kubectl" "$kflags"
  if [[ -n "$HELM_VERSION" ]]; then
    go_build "$HERE/helm" helm.sh/helm/v3/cmd/helm "$CACHE/helm-$HELM_VERSION/helm" \
      "-X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
  fi
}

# Keycloak from Maven Central, checked against the published SHA-512, unpacked into the cache.
install_keycloak() {
  local dir="$CACHE/keycloak-$KEYCLOAK_VERSION"
  if [[ -f "$dir/.agentgate-built" ]]; then
    log "cached: $dir"
    return
  fi
  if [[ -x "$dir/bin/kc.sh" ]]; then
    keycloak_build "$dir"
    return
  fi
  local base="https://repo1.maven.org/maven2/org/keycloak/keycloak-quarkus-dist/$KEYCLOAK_VERSION"
  local file="keycloak-quarkus-dist-$KEYCLOAK_VERSION.tar.gz"
  log "downloading Keycloak $KEYCLOAK_VERSION from Maven Central (about 160 MB)"
  mkdir -p "$CACHE"
  local tmp
  tmp="$(mktemp -d "$CACHE/.keycloak.XXXXXX")"
  curl -fsSL --retry 3 -o "$tmp/$file" "$base/$file"
  local want
  want="$(curl -fsSL --retry 3 "$base/$file.sha512" | cut -d' ' -f1)"
  echo "$want  $tmp/$file" | sha512sum -c --quiet - || { log "checksum mismatch for $file"; exit 1; }
  tar -xzf "$tmp/$file" -C "$tmp"
  rm -rf "$dir"
  mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$dir"
  rm -rf "$tmp"
  keycloak_build "$dir"
}

# The PostgreSQL JDBC driver jar, checked against Maven Central's published SHA-1.
install_pgjdbc() {
  local dir="$CACHE/pgjdbc-$PGJDBC_VERSION" base
  if [[ -f "$dir/postgresql.jar" ]]; then
    log "cached: $dir/postgresql.jar"
    return
  fi
  base="https://repo1.maven.org/maven2/org/postgresql/postgresql/$PGJDBC_VERSION/postgresql-$PGJDBC_VERSION.jar"
  log "downloading the PostgreSQL JDBC driver $PGJDBC_VERSION from Maven Central"
  mkdir -p "$dir"
  curl -fsSL --retry 3 -o "$dir/postgresql.jar.tmp" "$base"
  echo "$(curl -fsSL --retry 3 "$base.sha1" | cut -d' ' -f1)  $dir/postgresql.jar.tmp" | sha1sum -c --quiet - \
    || { log "checksum mismatch for the JDBC driver"; exit 1; }
  mv "$dir/postgresql.jar.tmp" "$dir/postgresql.jar"
}

# Keycloak's one-time build for what the tests run: an in-memory database, HTTPS only.
keycloak_build() {
  local dir="$1" jdk
  # The newest JDK installed (Keycloak 26 runs on 17, faster on 21+).
  jdk="$(ls -d /usr/lib/jvm/*/ 2>/dev/null | while read -r d; do
      [[ -x "$d/bin/java" ]] && printf '%s %s\n' "$(basename "$d" | grep -o '[0-9]\+' | head -1)" "${d%/}"
    done | sort -n | tail -1 | cut -d' ' -f2)"
  log "building Keycloak for the tests (JDK: ${jdk:-java on PATH})"
  mkdir -p "$dir/tmp"
  JAVA_HOME="${jdk:-${JAVA_HOME:-}}" JAVA_OPTS_APPEND="-Djava.io.tmpdir=$dir/tmp -XX:-UsePerfData --add-opens=java.base/java.lang=ALL-UNNAMED -XX:TieredStopAtLevel=1" \
    "$dir/bin/kc.sh" build --db=dev-mem >"$dir/agentgate-build.log" 2>&1 || { cat "$dir/agentgate-build.log" >&2; exit 1; }
  touch "$dir/.agentgate-built"
}

# Prints the environment variables the harness reads to find the binaries.
print_env() {
  cat <<ENV
export AGENTGATE_ETCD=$CACHE/etcd-$ETCD_VERSION/etcd
export AGENTGATE_KUBE_APISERVER=$CACHE/kubernetes-$K8S_VERSION/kube-apiserver
export AGENTGATE_KUBECTL=$CACHE/kubernetes-$K8S_VERSION/kubectl
export AGENTGATE_HELM=$CACHE/helm-$HELM_VERSION/helm
export AGENTGATE_KEYCLOAK=$CACHE/keycloak-$KEYCLOAK_VERSION
export AGENTGATE_PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
ENV
}

case "${1:-all}" in
  debs) install_debs ;;
  go) build_go ;;
  keycloak) install_keycloak ;;
  jdbc) install_pgjdbc ;;
  env) print_env ;;
  all) install_debs; install_rust_components; build_go; install_keycloak; install_pgjdbc ;;
  *) echo "usage: $0 [all|debs|go|keycloak|jdbc|env]" >&2; exit 2 ;;
esac
