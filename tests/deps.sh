#!/usr/bin/env bash
# What the tests need from the machine, in one place (`make deps`, which `make test` runs first; .ci/run
# runs `make test`). On a fresh Debian or Ubuntu box:
#   tests/deps.sh system          as root: apt-get installs what is missing; as anyone else: one line
#                                 naming the packages and the command to run, and exit 1
#   tests/deps.sh caches PYTHON   the real gVisor runsc and Debian 12's dockerd the container-mode
#                                 tests run, unpacked from Debian's archive into ~/.cache (no root)
#
# One line per package: `want PACKAGE (command PROGRAM | path FILE | python MODULES)  # why`.
set -euo pipefail
cd "${BASH_SOURCE[0]%/*}/.."

missing=()
want() {
    local pkg="$1" kind="$2" what="$3"
    case "$kind" in
        command) command -v "$what" > /dev/null 2>&1 && return 0 ;;
        path) [ -e "$what" ] && return 0 ;;
        python) python3 -c "import $what" > /dev/null 2>&1 && return 0 ;;
        *) echo "tests/deps.sh: unknown check '$kind' for $pkg" >&2; exit 2 ;;
    esac
    case " ${missing[*]-} " in
        *" $pkg "*) ;;
        *) missing+=("$pkg") ;;
    esac
}

system() {
    want python3-venv python "ensurepip, venv"      # make venv: the tests' own virtualenv
    want make command make                          # the README's test command
    want systemd command systemd-analyze            # systemd-analyze verify checks every unit we write
    want shellcheck command shellcheck              # install.sh stays shellcheck-clean (tests/install_sh)
    want nebula command nebula-cert                 # the real nebula and nebula-cert of the overlay tests
    want iproute2 command ip                        # network namespaces (overlay, Nomad, proxy tests)
    want iputils-ping command ping                  # traffic across the overlay between namespaces
    want curl command curl                          # install.sh's downloads; Nomad's HTTP API certificate
    want jq command jq                              # install.sh reads the signed manifest with it
    want openssl command openssl                    # install.sh verifies the manifest's signature
    want gcc command cc                             # builds the heartbeat benchmark's load generator
    want libssl-dev path /usr/include/openssl/ssl.h # ... which links the system's OpenSSL
    want golang-go command go                       # builds tests/nomad's reader on Nomad's HCL 1 parser
    want golang-github-hashicorp-hcl-dev path /usr/share/gocode/src/github.com/hashicorp/hcl  # its sources
    want debian-archive-keyring path /usr/share/keyrings/debian-archive-keyring.gpg  # verifies the
    #                                               Debian archive runsc and dockerd are fetched from
    want dpkg command dpkg-deb                      # unpacks them
    want qemu-system-x86 command qemu-system-x86_64  # the VM-attach probe's tests start the real QEMU
    want tinyproxy-bin command tinyproxy            # the HTTP CONNECT proxy of the proxy tests (tests/transport);
    #                                               the binary alone: `tinyproxy` also starts a system daemon

    [ "${#missing[@]}" -gt 0 ] || return 0
    if [ "$(id -u)" -eq 0 ]; then
        echo "tests/deps.sh: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}"
    else
        echo "tests/deps.sh: the tests need ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (or 'sudo make deps'), then re-run" >&2
        exit 1
    fi
}

caches() {
    local python="$1"
    "$python" -m hostsim.runsc fetch
    "$python" -m hostsim.dockerd fetch
    # Prometheus' promtool, which lints the doctor's metrics: Debian has it only in the prometheus
    # package, whose install would start a Prometheus server here, so only its promtool is kept.
    "$python" -m hostsim.promtool fetch
}

case "${1:-}" in
    system) system ;;
    caches) caches "${2:?tests/deps.sh caches PYTHON}" ;;
    *) echo "usage: tests/deps.sh system | caches PYTHON" >&2; exit 2 ;;
esac
