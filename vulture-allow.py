# Names vulture (make lint) cannot see used: read by the frameworks that call them, or kept because
# they complete a documented set. Anything else it reports is dead code to remove.
from bootstrap.commands import install
from bootstrap import pci, settings
from hostsim import kernel, systemd

install.EXIT_USAGE  # the exit-code table: 2 is raised as UsageError's code
systemd.EXIT_NO_UNIT  # systemctl's LSB codes, 3 to 5
kernel.simulate  # named by the tests as the tree simulator entry
pci.PciDevice.subsystem_vendor_id  # sysfs attributes the PCI model carries (to_json, reports)
pci.PciDevice.subsystem_device_id
pci.PciDevice.driver_override
# settings read through the table (bootstrap.settings.ROWS), by name
settings.Settings.cpu_threshold
settings.Settings.memory_threshold
settings.Settings.disk_threshold
# ssl / requests / sqlite / http.server / cheroot / configparser attributes and hooks
_.readable  # io.RawIOBase: bootstrap.api's wire, read by http.client
_.readinto
_.makefile
_.cert_verify
_.cert_reqs
_.trust_env
_.gname
_.uname
_.row_factory
_.wrap
_.ssl_env
_.ConnectionClass
_.gateway
_.reuse_port
_.num_tickets
_.do_GET
_.do_POST
_.do_PATCH
_.log_message
_.close_connection
_.optionxform
_.f_bfree  # an os.statvfs_result stand-in's fields (tests/test_host.py)
_.f_bsize
_.kernel_version  # the guest image's record, shown in its repr
_.before_mode  # plan.Item: the mode a file had before the run (set positionally)
_.longrepr  # pytest's TestReport: what a failed test shows (tests/conftest.py)
_.last_used  # cheroot's ConnectionManager reads it to expire idle connections (controlplane.server)
_.can_add_keepalive_connection  # cheroot asks its connection manager
_.protocol_version  # http.server's BaseHTTPRequestHandler (tests/tampering.py)
