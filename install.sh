#!/usr/bin/env bash
# vectorlay-node installer: turns this box into a vectorlay provider node.
#
#   curl -fsSL https://<api>/install.sh | sudo bash -s -- [gpu=1] [api=URL]
#
# With no token given it asks for the provisioning token on the terminal (hidden): a token typed there
# is in no process's command line. Arguments (key=value): token-file=FILE (the token read from a file,
# for unattended installs), token=vtk_... (moved into the environment at once), gpu=1 (container-GPU mode: gVisor + nvproxy instead of VFIO passthrough), api=URL,
# NODE_AGENT_AUTOUPDATE=0 (no automatic agent updates on this node), proxy=http://host:port (an HTTP
# proxy for every HTTPS request of the node, remembered in /etc/vectorlay/node.yaml; https_proxy and
# no_proxy in the environment are honoured as they are).
#
# Everything below runs inside one function that is called on the very last line: a download cut
# short anywhere defines at most part of a function and runs nothing. The call ends in a sentinel
# argument, so a line cut mid-way (`vectorlay_install "$@" --end-of-scr`) is refused too.

vectorlay_install() {
    set -euo pipefail
    umask 022
    if [ "$#" -eq 0 ] || [ "${!#}" != --end-of-script ]; then
        printf 'error: install.sh was cut short in transit\n  fix: re-run the command\n' >&2
        return 1
    fi
    set -- "${@:1:$#-1}"
    printf 'vectorlay-node installer: starting\n'

    # Filled in by the control plane that serves this script; a copy from the repository needs api=.
    local default_api='@@VECTORLAY_API@@'
    local ca_pem='@@VECTORLAY_CA_PEM@@'
    local manifest_key='@@VECTORLAY_MANIFEST_KEY@@'

    local root="${VECTORLAY_ROOT:-}"  # tests and the demo point this at a tree; a real box leaves it empty
    local api="" gpu_mode="" token_arg="" token_file="" autoupdate="${NODE_AGENT_AUTOUPDATE:-}" proxy=""
    local -a passthrough_args=()
    local arg
    for arg in "$@"; do
        case "$arg" in
            token=*) token_arg="${arg#token=}" ;;
            token-file=*) token_file="${arg#token-file=}" ;;
            api=*) api="${arg#api=}" ;;
            proxy=*) proxy="${arg#proxy=}" ;;
            gpu=1) gpu_mode=container ;;
            gpu=0) gpu_mode="" ;;
            NODE_AGENT_AUTOUPDATE=0 | NODE_AGENT_AUTOUPDATE=1) autoupdate="${arg#NODE_AGENT_AUTOUPDATE=}" ;;
            *)
                printf 'error: unknown argument %q\n' "$arg" >&2
                printf '  fix: use token=vtk_..., token-file=FILE, gpu=1, api=URL, proxy=URL or NODE_AGENT_AUTOUPDATE=0\n' >&2
                return 2
                ;;
        esac
        [ "${arg%%=*}" = token ] || passthrough_args+=("$arg")
    done

    # A token given as an argument is visible in the process list: move it into the environment
    # and start again without it, before anything else runs.
    if [ -n "$token_arg" ]; then
        export VECTORLAY_TOKEN="$token_arg"
        exec bash -c "$(declare -f vectorlay_install); vectorlay_install \"\$@\" --end-of-script" vectorlay-install \
            "${passthrough_args[@]+"${passthrough_args[@]}"}"
    fi

    if [ -z "$api" ]; then
        case "$default_api" in
            @@*) printf 'error: no control plane given\n  fix: add api=https://... to the command\n' >&2; return 2 ;;
            *) api="$default_api" ;;
        esac
    fi
    # proxy=: this script's curl and the installer use it now (as https_proxy), and the installer
    # keeps it in node.yaml (VECTORLAY_PROXY) for the agents and their updates.
    if [ -n "$proxy" ]; then
        export https_proxy="$proxy" HTTPS_PROXY="$proxy" VECTORLAY_PROXY="$proxy"
    fi
    api="${api%/}"
    case "$api" in
        https://*) ;;
        *) printf 'error: api=%s is not an https:// URL\n' "$api" >&2; return 2 ;;
    esac

    if [ "${EUID:-$(id -u)}" -ne 0 ]; then
        printf 'error: the installer must run as root\n  fix: re-run it with sudo (curl -fsSL %s/install.sh | sudo bash)\n' \
            "$api" >&2
        return 1
    fi

    # The releases vectorlay-node is tested on, as bootstrap/platform.py lists them (SUPPORTED_RELEASES,
    # MIN_PYTHON): tests/install_sh/test_os_support.py keeps these lines equal to it.
    local supported_releases='ubuntu:22.04 ubuntu:24.04 ubuntu:26.04 debian:12 debian:13'
    local supported_names='Ubuntu 22.04, Ubuntu 24.04, Ubuntu 26.04, Debian 12 and Debian 13' min_python=3.10
    local os_id="" os_version="" os_pretty="" os_like="" key value
    if [ -r "$root/etc/os-release" ]; then
        while IFS='=' read -r key value; do
            value="${value#\"}"; value="${value%\"}"
            case "$key" in
                ID) os_id="$value" ;;
                VERSION_ID) os_version="$value" ;;
                PRETTY_NAME) os_pretty="$value" ;;
                ID_LIKE) os_like="$value" ;;
            esac
        done < "$root/etc/os-release"
    fi
    local os_found="${os_pretty:-${os_id:-unknown} ${os_version}}"
    case " $supported_releases " in
        *" $os_id:$os_version "*) ;;
        *)
            # Not a tested release: another Debian or Ubuntu goes on if it has what the node needs (the
            # same checks as bootstrap/platform.py's os_support, on the same files).
            local -a lacks=()
            local capabilities="systemd, Python $min_python or newer, GRUB and the vfio modules"
            case " $os_id $os_like " in
                *" debian "* | *" ubuntu "*) ;;
                *) lacks+=("not Debian or Ubuntu (ID=${os_id:-unknown}${os_like:+, ID_LIKE=$os_like})") ;;
            esac
            [ -d "$root/run/systemd/system" ] || lacks+=("systemd is not the running init (no /run/systemd/system)")
            local py_link=""
            [ ! -L "$root/usr/bin/python3" ] || py_link="$(readlink "$root/usr/bin/python3")"
            py_link="${py_link##*/}"
            if [[ "$py_link" =~ ^python([0-9]+)\.([0-9]+)$ ]]; then
                local py_major="${BASH_REMATCH[1]}" py_minor="${BASH_REMATCH[2]}"
                if [ "$py_major" -lt "${min_python%%.*}" ] \
                    || { [ "$py_major" -eq "${min_python%%.*}" ] && [ "$py_minor" -lt "${min_python#*.}" ]; }; then
                    lacks+=("Python $py_major.$py_minor ($min_python or newer needed)")
                fi
            fi
            local sbin tool grub_found=""
            for sbin in /usr/sbin /sbin /usr/bin /bin; do
                for tool in update-grub grub-mkconfig; do
                    [ ! -f "$root$sbin/$tool" ] || [ ! -x "$root$sbin/$tool" ] || grub_found=1
                done
            done
            [ -n "$grub_found" ] || lacks+=("no GRUB (neither update-grub nor grub-mkconfig)")
            local kernel="" modules_dir vfio_found=""
            [ ! -r "$root/proc/sys/kernel/osrelease" ] || read -r kernel < "$root/proc/sys/kernel/osrelease"
            if [ -n "$kernel" ]; then
                for modules_dir in "$root/lib/modules/$kernel" "$root/usr/lib/modules/$kernel"; do
                    grep -qsE '(^|/)vfio-pci\.ko' "$modules_dir/modules.dep" "$modules_dir/modules.builtin" \
                        && vfio_found=1
                done
            fi
            [ -n "$vfio_found" ] || lacks+=("no vfio-pci kernel module for kernel ${kernel:-(unknown)}")
            if [ "${#lacks[@]}" -gt 0 ]; then
                local why="" item
                for item in "${lacks[@]}"; do why="${why:+$why; }$item"; done
                printf 'error: unsupported OS: %s: %s\n' "$os_found" "$why" >&2
                printf '  fix: vectorlay-node supports %s, and other Debian or Ubuntu releases with %s\n' \
                    "$supported_names" "$capabilities" >&2
                return 1
            fi
            printf 'WARN: %s is not a release vectorlay-node is tested on (%s); it has %s, so the install goes on\n' \
                "$os_found" "$supported_names" "$capabilities" >&2
            ;;
    esac

    local arch
    arch="$(uname -m)"
    if [ "$arch" != x86_64 ]; then
        printf 'error: unsupported architecture %s\n  fix: vectorlay-node runs on x86_64 hosts\n' "$arch" >&2
        return 1
    fi
    printf 'vectorlay-node installer: %s (%s), control plane %s\n' "${os_pretty:-$os_id $os_version}" "$arch" "$api"

    # The installer artifact holds wheels for CPython 3.10 to 3.14, the python3 of Ubuntu 22.04 to
    # 26.04 and Debian 12 and 13: another python3 is refused here, before apt or pip change anything.
    # A box without python3 gets its release's own with python3-venv below, and is checked then.
    vectorlay_python_ok() {
        local impl="" major="" minor=""
        read -r impl major minor < <(python3 -c \
            'import sys; print(sys.implementation.name, *sys.version_info[:2])' 2>/dev/null) || true
        local need='vectorlay-node needs Python 3.10 to 3.14 (the system python3 of Ubuntu 22.04+ / Debian 12+)'
        if [ "$impl" != cpython ] || ! [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]]; then
            printf 'error: python3 (%s) is not a CPython that runs: %s\n' "$(command -v python3 || echo none)" "$need" >&2
            printf "  fix: install the release's own python3 (apt-get install python3-venv)\n" >&2
            return 1
        elif [ "$major" -ne 3 ] || [ "$minor" -lt 10 ]; then
            printf 'error: Python %s.%s is too old: %s\n' "$major" "$minor" "$need" >&2
            printf '  fix: install on Ubuntu 22.04 or later, or Debian 12 or later\n' >&2
            return 1
        elif [ "$minor" -gt 14 ]; then
            printf 'error: Python %s.%s is newer than this installer: %s\n' "$major" "$minor" "$need" >&2
            printf '  fix: ask the control plane operator for a vectorlay-node release built for Python %s.%s\n' \
                "$major" "$minor" >&2
            return 1
        fi
    }
    local python_checked=""
    if command -v python3 > /dev/null 2>&1; then
        vectorlay_python_ok || return 1
        python_checked=1
    fi

    # The token: token-file=, else VECTORLAY_TOKEN, else asked on the terminal. Under `curl ... | sudo
    # bash` this script's standard input is the script itself, so the question and the answer go
    # through /dev/tty; the answer stays in this shell and reaches the installer in its environment.
    local -a token_args=()
    if [ -n "$token_file" ]; then
        if ! [ -f "$token_file" ] || ! [ -r "$token_file" ]; then
            printf 'error: token-file=%s is not a readable file\n' "$token_file" >&2
            printf '  fix: write the provisioning token (vtk_...) into that file (chmod 600), then re-run\n' >&2
            return 2
        fi
        token_args=(--token-file "$token_file")
    elif [ -z "${VECTORLAY_TOKEN:-}" ] && ! [ -s "$root/etc/vectorlay/identity/node.crt" ]; then
        if ! { : < /dev/tty; } 2> /dev/null; then
            printf 'error: no provisioning token, and no terminal to ask for one\n' >&2
            printf '  fix: run the one-liner in a terminal (it asks for the token), or add token-file=FILE\n' >&2
            return 1
        fi
        local typed=""
        printf 'Provisioning token (vtk_..., from the dashboard; it is not shown as you type): ' > /dev/tty
        IFS= read -rs typed < /dev/tty || true
        printf '\n' > /dev/tty
        if [ -z "$typed" ]; then
            printf 'error: no provisioning token given\n  fix: re-run and paste the token from the dashboard\n' >&2
            return 1
        fi
        export VECTORLAY_TOKEN="$typed"
    fi

    local -a missing=()
    local pkg
    local -a wanted=(python3-venv jq tar unzip pciutils curl ca-certificates openssl)
    # Every node but a container-GPU one rents VMs: Nomad's qemu driver starts them, and the VM-attach
    # probe proves each GPU unit with the same QEMU before it is advertised.
    [ "$gpu_mode" = container ] || wanted+=(qemu-system-x86)
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        printf 'vectorlay-node installer: installing %s\n' "${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    [ -n "$python_checked" ] || vectorlay_python_ok || return 1

    local etc="$root/etc/vectorlay" opt="$root/opt/vectorlay"
    mkdir -p "$etc" "$opt/venvs" "$opt/wheelhouse"
    local -a curl_tls=(--proto "=https" --tlsv1.2 --fail --silent --show-error --location
        --retry 3 --retry-connrefused --max-time 300)
    local -a ca_args=()
    case "$ca_pem" in
        @@*) ;;
        *)
            # The control plane's own CA, pinned by the script it served: written once, atomically.
            printf '%s\n' "$ca_pem" > "$etc/.control-plane-ca.crt.tmp"
            mv -f "$etc/.control-plane-ca.crt.tmp" "$etc/control-plane-ca.crt"
            ;;
    esac
    if [ -n "${VECTORLAY_CA_FILE:-}" ]; then
        ca_args=(--ca-file "$VECTORLAY_CA_FILE")
        curl_tls+=(--cacert "$VECTORLAY_CA_FILE")
    elif [ -s "$etc/control-plane-ca.crt" ]; then
        ca_args=(--ca-file "$etc/control-plane-ca.crt")
        curl_tls+=(--cacert "$etc/control-plane-ca.crt")
    fi

    local work
    work="$(mktemp -d "$opt/.install.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: $work is local to this function
    trap "rm -rf '$work'" EXIT

    printf 'vectorlay-node installer: fetching the signed artifact manifest\n'
    if ! curl "${curl_tls[@]}" -o "$work/manifest.json" "$api/v1/artifacts/manifest"; then
        printf 'error: could not fetch %s/v1/artifacts/manifest\n' "$api" >&2
        printf '  fix: check outbound HTTPS (443) to the control plane, then re-run\n' >&2
        return 1
    fi
    if ! jq -e 'type == "object" and (.artifacts | type == "array")' "$work/manifest.json" > /dev/null 2>&1; then
        printf 'error: %s/v1/artifacts/manifest did not answer with a manifest (HTML or garbage?)\n' "$api" >&2
        printf '  fix: check api=; re-run with curl -sS -w %s to see what it answers\n' "'HTTP %{http_code}\\n'" >&2
        return 1
    fi
    case "$manifest_key" in
        @@*)
            if [ -n "${VECTORLAY_MANIFEST_KEY_FILE:-}" ]; then
                cp "$VECTORLAY_MANIFEST_KEY_FILE" "$work/manifest-key.pem"
            else
                printf 'error: this copy of install.sh pins no manifest key\n' >&2
                printf '  fix: fetch install.sh from your control plane (https://<api>/install.sh)\n' >&2
                return 1
            fi
            ;;
        *) printf '%s\n' "$manifest_key" > "$work/manifest-key.pem" ;;
    esac
    jq -cSj 'del(.signature)' "$work/manifest.json" > "$work/manifest.signed"
    if ! jq -r '.signature // ""' "$work/manifest.json" | base64 -d > "$work/manifest.sig" 2>/dev/null \
        || ! openssl pkeyutl -verify -pubin -inkey "$work/manifest-key.pem" -rawin \
            -in "$work/manifest.signed" -sigfile "$work/manifest.sig" > /dev/null 2>&1; then
        # Not a stale download: what the control plane signs always verifies, so this is a manifest
        # someone altered or made, or a different server answering: a security event.
        printf 'error: SECURITY: the artifact manifest from %s does not verify against the key pinned in this install.sh: it was altered, or is not from your control plane\n' "$api" >&2
        printf '  fix: do not proceed and do not re-run blindly; check api= and any proxy or TLS-intercepting middlebox between this machine and %s, fetch install.sh again from your control plane, and if it persists contact vectorlay support with this message\n' "$api" >&2
        return 1
    fi
    # A manifest really signed but past its expiry is a replayed or frozen one (the control plane
    # signs every answer afresh). Its times are UTC in one fixed format, so strings compare as times.
    if ! jq -e --arg now "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        '(.expires_at | type == "string") and .expires_at > $now' "$work/manifest.json" > /dev/null 2>&1; then
        printf 'error: the artifact manifest from %s expired at %s: refusing a stale manifest\n' \
            "$api" "$(jq -r '.expires_at // "(no expiry)"' "$work/manifest.json")" >&2
        printf "  fix: check this machine's clock (timedatectl); if it is right, something between it and the control plane serves an old manifest\n" >&2
        return 1
    fi

    local wh_version wh_url wh_sha wh_size
    wh_version="$(jq -r '.artifacts[] | select(.name == "installer") | .version' "$work/manifest.json")"
    wh_url="$(jq -r '.artifacts[] | select(.name == "installer") | .url' "$work/manifest.json")"
    wh_sha="$(jq -r '.artifacts[] | select(.name == "installer") | .sha256' "$work/manifest.json")"
    wh_size="$(jq -r '.artifacts[] | select(.name == "installer") | .size' "$work/manifest.json")"
    if [ -z "$wh_version" ] || [ -z "$wh_sha" ]; then
        printf 'error: the manifest names no installer artifact (502 ARTIFACT)\n  fix: re-run later\n' >&2
        return 1
    fi
    case "$wh_url" in
        /*) wh_url="$api$wh_url" ;;
    esac
    local venv="$opt/venvs/$wh_sha"
    if [ -x "$venv/bin/vectorlay-bootstrap" ] && [ "$(cat "$venv/.complete" 2>/dev/null)" = "$wh_sha" ]; then
        printf 'vectorlay-node installer: installer %s already in place\n' "$wh_version"
    else
        printf 'vectorlay-node installer: fetching installer %s\n' "$wh_version"
        curl "${curl_tls[@]}" -o "$work/wheelhouse.tar.gz" "$wh_url"
        if [ "$(stat -c %s "$work/wheelhouse.tar.gz")" != "$wh_size" ] \
            || ! printf '%s  %s\n' "$wh_sha" "$work/wheelhouse.tar.gz" | sha256sum -c --status; then
            printf 'error: checksum mismatch / 502 ARTIFACT: installer %s\n' "$wh_version" >&2
            printf '  fix: a stale artifact — re-run; artifacts are re-fetched and verified each run\n' >&2
            return 1
        fi
        mkdir -p "$work/wheelhouse"
        tar -xzf "$work/wheelhouse.tar.gz" -C "$work/wheelhouse" --no-same-owner
        # A venv holds its own path in its scripts, so each installer gets its own directory and
        # /opt/vectorlay/venv is switched to it by renaming a link: never a half-updated venv.
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --no-index --find-links "$work/wheelhouse" \
            --disable-pip-version-check vectorlay-node
        printf '%s\n' "$wh_sha" > "$venv/.complete"
    fi
    ln -sfn "venvs/$wh_sha" "$opt/.venv.new"
    mv -T "$opt/.venv.new" "$opt/venv"
    local old
    for old in "$opt"/venvs/*; do
        [ "$old" = "$venv" ] || rm -rf "$old"
    done
    # `sudo vectorlay-node-doctor` from any shell: links on PATH, switched by rename like the venv.
    local tool
    mkdir -p "$root/usr/local/bin"
    for tool in vectorlay-node-doctor vectorlay-bootstrap; do
        ln -sfn "/opt/vectorlay/venv/bin/$tool" "$root/usr/local/bin/.$tool.new"
        mv -T "$root/usr/local/bin/.$tool.new" "$root/usr/local/bin/$tool"
    done

    local -a install_args=(install --api "$api")
    [ -z "$root" ] || install_args+=(--root "$root")
    [ -z "$gpu_mode" ] || install_args+=(--gpu-mode "$gpu_mode")
    install_args+=("${ca_args[@]+"${ca_args[@]}"}" "${token_args[@]+"${token_args[@]}"}")
    [ -z "$autoupdate" ] || export NODE_AGENT_AUTOUPDATE="$autoupdate"
    trap - EXIT
    rm -rf "$work"
    printf 'vectorlay-node installer: handing over to vectorlay-bootstrap\n'
    exec "$opt/venv/bin/vectorlay-bootstrap" "${install_args[@]}"
}

vectorlay_install "$@" --end-of-script
