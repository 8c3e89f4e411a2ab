"""kairos-libvirt: real-time virtual machines for libvirt-managed KVM hosts."""

__version__ = "0.1.0"

#: Namespace of the admin's declaration inside ``<metadata>``.
DECL_NS = "http://kairosvm.org/xmlns/libvirt/realtime/1.0"
#: Prefix used when our tools write the declaration through libvirt.
DECL_PREFIX = "kairos"
#: Namespace of the live state the agent publishes (``virsh metadata DOM URI``).
STATE_NS = "http://kairosvm.org/xmlns/libvirt/realtime-state/1.0"
STATE_PREFIX = "kairoslive"
