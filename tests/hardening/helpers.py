"""An enrolled host tree without a control plane: an identity whose files load, with any
enrollment.json, for the stages that only read it."""

from __future__ import annotations

import json
from pathlib import Path

from bootstrap.host import Host, TreeHost
from bootstrap.identity import NewIdentity, OverlayFiles, write_identity


def enrolled_host(root: Path, enrollment: object) -> Host:
    host = TreeHost(root)
    write_identity(
        host,
        NewIdentity(
            key_pem=b"key",
            cert_pem=b"crt",
            ca_pem=b"ca",
            node_token="vnt_" + "x" * 32,
            node={"node_id": "n1", "org_id": "o1", "overlay_ip": "10.42.0.2"},
            enrollment={},
            overlay=OverlayFiles(b"nkey", b"ncrt", b"nca", b"mkey", b"mcrt", b"mca"),
        ),
    )
    gen = host.path("/etc/vectorlay/identity")
    (gen / "enrollment.json").write_text(
        enrollment if isinstance(enrollment, str) else json.dumps(enrollment)
    )
    return host
