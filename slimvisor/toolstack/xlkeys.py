"""The answer slimvisor gives to every key xl.cfg(5) documents: the one table, rendered into docs/xlcfg.md.

Each key is one of:

- supported: `toolstack/xlcfg.py` reads it, and the row says what it does here;
- ignored: accepted with one warning, because it has no effect on a domain here (the row says why);
- refused: "not supported by slimvisor", with the reason; a refused key may name `harmless` values
  (`serial="none"`, `vnc=0`, an empty device list) that are accepted as ignored instead.

A key not in this table is an "unknown key", with did-you-mean; besides xl.cfg(5)'s, the table holds
slimvisor's own keys and a few older ones that libvirt and xen-tools still write.
The keys are the top-level items of Xen's docs/man/xl.cfg.5.pod.in (161 of them), in its order.
`python -m slimvisor.toolstack.xlkeys > docs/xlcfg.md` writes the document; a test keeps it in sync.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Answer(enum.Enum):
    SUPPORTED = "supported"
    IGNORED = "ignored"
    REFUSED = "refused"


@dataclass(frozen=True)
class Key:
    name: str
    answer: Answer
    why: str  # what it does here (supported), why it has no effect (ignored), or why it is refused
    section: str  # xl.cfg(5)'s, or "slimvisor" for slimvisor's own keys
    harmless: tuple[str, ...] = ()  # refused keys: values that are ignored instead ("" is an empty list)

    @property
    def documented(self) -> bool:
        """In xl.cfg(5) (not one of slimvisor's own keys, nor a legacy one)."""
        return self.section not in (SLIMVISOR, LEGACY)


SLIMVISOR = "slimvisor"
LEGACY = "legacy"  # not in xl.cfg(5), but written by xend-era tools and libvirt, and read (or skipped) by xl
S, IG, R = Answer.SUPPORTED, Answer.IGNORED, Answer.REFUSED
OFF = ("0", "")  # a boolean left off, or an empty list
_HVM = "an HVM guest setting, which xl too ignores for a PV guest"
_HVM_DISPLAY = "an HVM emulated display setting; a PV domain here has its console only (xl ignores it for PV)"
_SPICE = "SPICE is an HVM display; a PV domain here has its console only"
_XEN = "a limit inside the Xen hypervisor, which slimvisor does not have"
_PAGING = "Xen's paging mode; UML guest memory is ordinary host memory"
_ARM = "an ARM guest setting; this host runs x86 guests"
_DM = "no device model (QEMU) runs for a PV domain here: its devices are slimvisor's vhost-user backends"
_STUBDOM = "device-model stub domains belong to HVM guests"
_DEVICE = "slimvisor has no such device for a PV domain"
_PCI_OPT = "applies to passed-through PCI devices (pci=), which slimvisor refuses"
_BOOTLOADER_OPT = "used only by bootloader=, which slimvisor refuses"
_SMBIOS = "SMBIOS/ACPI tables are HVM firmware; a PV domain has none"

TABLE: tuple[Key, ...] = (
    # Mandatory Configuration Items
    Key("name", S, "the domain's name (letters, digits, '.', '_', '-'; at most 64)", "Mandatory Configuration Items"),
    # Selecting Guest Type
    Key("type", S, '"pv": User-Mode Linux (or PVH, when the kernel is an ordinary x86 kernel, as Xen\'s pvshim); '
        '"pvh": QEMU microvm entered at the kernel\'s PVH ELF note; "hvm": QEMU q35 with SeaBIOS',
        "Selecting Guest Type"),
    Key("builder", S, 'the deprecated type=: "generic" is type="pv", "hvm" is type="hvm"', "Selecting Guest Type"),
    # CPU Allocation
    Key("pool", R, "there are no CPU pools; use cpus= to pin", "CPU Allocation", ("Pool-0", "")),
    Key("vcpus", S, "PVH and HVM: 1 to 64 (a QEMU thread each); PV on User-Mode Linux: 1", "CPU Allocation"),
    Key("maxvcpus", R, "vCPU hot-plug is not offered: give vcpus=", "CPU Allocation", ("1",)),
    Key("cpus", S, "pins the domain's vCPU to host CPUs (a cpuset of its tasks)", "CPU Allocation"),
    Key("cpus_soft", IG, "soft affinity is a hint to Xen's scheduler; Linux schedules the domain's tasks itself",
        "CPU Allocation"),
    # CPU Scheduling
    Key("cpu_weight", S, "the domain's share of CPU against others (cgroup cpu.shares)", "CPU Scheduling"),
    Key("cap", S, "the most CPU the domain may use, in percent of one CPU (cgroup CFS quota)", "CPU Scheduling"),
    # Memory Allocation
    Key("memory", S, "the memory the domain starts with, in MiB", "Memory Allocation"),
    Key("maxmem", S, "the most memory the domain may have: above memory=, it starts ballooned down to memory= "
        "and `slimvisor mem-set` can give it up to maxmem", "Memory Allocation"),
    # Guest Virtual NUMA Configuration
    Key("vnuma", R, "a UML guest has no NUMA topology", "Guest Virtual NUMA Configuration", ("",)),
    # Event Actions
    Key("on_poweroff", S, "destroy, restart, rename-restart or preserve (coredump-* and soft-reset are refused)",
        "Event Actions"),
    Key("on_reboot", S, "as on_poweroff", "Event Actions"),
    Key("on_watchdog", IG, "there is no watchdog device, so the event never happens", "Event Actions"),
    Key("on_crash", S, "as on_poweroff; a guest kernel panic or a crashed UML is a crash", "Event Actions"),
    Key("on_soft_reset", IG, "soft reset is a Xen HVM hypercall; it never happens here", "Event Actions"),
    # Direct Kernel Boot
    Key("kernel", S, "PV: a User-Mode Linux kernel [default: the host's linux.uml], or an ordinary x86 bzImage or "
        "vmlinux, which runs the domain as PVH (HVM without the PVH note); HVM without one: the first disk boots",
        "Direct Kernel Boot"),
    Key("ramdisk", S, "the initramfs [default: slimvisor's own boot initramfs when booting from a disk]",
        "Direct Kernel Boot"),
    Key("cmdline", S, "the whole kernel command line (root= and extra= are then ignored)", "Direct Kernel Boot"),
    Key("root", S, 'root=ROOT on the command line; Xen names (/dev/xvda1, /dev/sda, /dev/hdb) name the disk with '
        'that vdev (docs/xlcfg.md, "Disks")', "Direct Kernel Boot"),
    Key("extra", S, "appended to the command line; console=hvc0 or xvc0 is the domain's console", "Direct Kernel Boot"),
    # Non direct Kernel Boot
    Key("firmware", R, "HVM domains boot SeaBIOS; pvgrub and UEFI are not offered", "Non direct Kernel Boot",
        ("bios", "seabios")),
    Key("pvshim", R, "the PV shim runs PV guests inside PVH ones; slimvisor runs PV guests directly",
        "Non direct Kernel Boot", OFF),
    Key("pvshim_path", IG, "used only with pvshim=1, which is refused", "Non direct Kernel Boot"),
    Key("pvshim_cmdline", IG, "used only with pvshim=1, which is refused", "Non direct Kernel Boot"),
    Key("pvshim_extra", IG, "used only with pvshim=1, which is refused", "Non direct Kernel Boot"),
    # Other Options
    Key("uuid", S, "the domain's UUID (in xenstore and `slimvisor list -l`) [default: a random one]", "Other Options"),
    Key("seclabel", R, "XSM/FLASK labels are not enforced: each domain has its own jail (uid, namespaces, seccomp) "
        "instead, and a label that silently did nothing would mislead", "Other Options"),
    Key("init_seclabel", R, "as seclabel", "Other Options"),
    Key("max_grant_frames", IG, _XEN, "Other Options"),
    Key("max_maptrack_frames", IG, _XEN, "Other Options"),
    Key("max_grant_version", IG, _XEN, "Other Options"),
    Key("nomigrate", IG, "migration is asked for by command (slimvisor migrate); a domain that cannot migrate says "
        "why then", "Other Options"),
    Key("driver_domain", R, "slimvisor's backends run in dom0's own processes; a domain cannot serve others",
        "Other Options", ("0",)),
    Key("device_tree", IG, _ARM, "Other Options"),
    Key("passthrough", R, "there is no device passthrough (no IOMMU here)", "Other Options", ("disabled", "default")),
    Key("xend_suspend_evtchn_compat", IG, "Xen event channels do not exist here", "Other Options"),
    Key("vmtrace_buf_kb", R, "processor tracing of the guest is not available", "Other Options", ("0",)),
    Key("vpmu", IG, "a Xen PMU setting; UML has no virtual performance counters", "Other Options"),
    # Xenstore related settings
    Key("xenstore_feature_mask", IG, "slimvisor's xenstore offers its own features", "Xenstore related settings"),
    Key("xenstore_quota", IG, "slimvisor's xenstore applies its own per-domain quotas (docs/security.md)",
        "Xenstore related settings"),
    # Devices
    Key("disk", S, "virtio disks served over vhost-user (see Disks below)", "Devices"),
    Key("vif", S, "network cards on a dom0 switch named by bridge= (see xl-network-configuration)", "Devices"),
    Key("vtpm", R, "there is no vTPM device", "Devices", ("",)),
    Key("p9", R, "there is no 9pfs device (host file sharing is off: see docs/security.md)", "Devices", ("",)),
    Key("pvcalls", R, "there is no PV calls device", "Devices", ("",)),
    Key("vfb", R, "there is no framebuffer: a domain has a text console", "Devices", ("",)),
    Key("channel", R, "xl's channels are not there yet (`slimvisor run --channel` has virtio-console ports)",
        "Devices", ("",)),
    Key("rdm", IG, "reserved device memory matters only with PCI passthrough, which is refused", "Devices"),
    Key("usbctrl", R, "there is no USB", "Devices", ("",)),
    Key("usbdev", R, "there is no USB", "Devices", ("",)),
    Key("pci", R, "there is no PCI passthrough (no IOMMU here)", "Devices", ("",)),
    Key("pci_permissive", IG, _PCI_OPT, "Devices"),
    Key("pci_msitranslate", IG, _PCI_OPT, "Devices"),
    Key("pci_seize", IG, _PCI_OPT, "Devices"),
    Key("pci_power_mgmt", IG, _PCI_OPT, "Devices"),
    Key("gfx_passthru", R, "there is no graphics passthrough", "Devices", ("0",)),
    Key("rdm_mem_boundary", IG, _PCI_OPT, "Devices"),
    Key("dtdev", R, "device-tree passthrough is ARM's", "Devices", ("",)),
    Key("ioports", R, "a domain gets no host I/O ports", "Devices", ("",)),
    Key("iomem", R, "a domain gets no host memory ranges", "Devices", ("",)),
    Key("irqs", R, "a domain gets no host interrupts", "Devices", ("",)),
    Key("max_event_channels", IG, "Xen event channels do not exist here", "Devices"),
    Key("vdispl", R, "there is no virtual display device", "Devices", ("",)),
    Key("dm_restrict", IG, _DM + "; they run jailed anyway (docs/security.md)", "Devices"),
    Key("device_model_user", IG, _DM + "; they run jailed anyway (docs/security.md)", "Devices"),
    Key("vsnd", R, "there is no sound device", "Devices", ("",)),
    Key("vkb", R, "there is no virtual keyboard: a domain has a text console", "Devices", ("",)),
    Key("virtio", R, "xl's virtio= (ARM virtio-mmio devices of a backend domain) is not there; slimvisor's "
        "own devices are virtio already", "Devices", ("",)),
    Key("tee", R, "there is no TEE mediator (ARM)", "Devices", ("none",)),
    # Paravirtualised (PV) Guest Specific Options
    Key("bootloader", S, '"pygrub" (or a path ending in pygrub): the kernel, initramfs and command line of the '
        "first disk's GRUB configuration (grub.cfg or menu.lst, read by a jailed debugfs), booted as PVH or HVM",
        "Paravirtualised (PV) Guest Specific Options"),
    Key("bootloader_args", S, "pygrub's options: --entry=N|TITLE, --kernel=, --ramdisk=, --args=",
        "Paravirtualised (PV) Guest Specific Options"),
    Key("bootloader_restrict", IG, _BOOTLOADER_OPT, "Paravirtualised (PV) Guest Specific Options"),
    Key("bootloader_user", IG, _BOOTLOADER_OPT, "Paravirtualised (PV) Guest Specific Options"),
    Key("e820_host", R, "a UML guest has no host memory map to mirror", "Paravirtualised (PV) Guest Specific Options",
        ("0",)),
    # Fully-virtualised (HVM) Guest Specific Options
    Key("boot", IG, "an HVM domain without a kernel boots its first disk (SeaBIOS); no other order is offered",
        "Boot Device"),
    Key("hdtype", IG, _HVM, "Emulated disk controller type"),
    Key("hap", IG, _PAGING, "Paging"),
    Key("oos", IG, _PAGING, "Paging"),
    Key("shadow_memory", IG, _PAGING, "Paging"),
    Key("bios", IG, _HVM, "Processor and Platform Features"),
    Key("bios_path_override", IG, _HVM, "Processor and Platform Features"),
    Key("pae", IG, _HVM, "Processor and Platform Features"),
    Key("acpi", IG, _HVM, "Processor and Platform Features"),
    Key("acpi_s3", IG, _HVM, "Processor and Platform Features"),
    Key("acpi_s4", IG, _HVM, "Processor and Platform Features"),
    Key("acpi_laptop_slate", IG, _HVM, "Processor and Platform Features"),
    Key("apic", IG, _HVM, "Processor and Platform Features"),
    Key("nx", IG, _HVM, "Processor and Platform Features"),
    Key("hpet", IG, _HVM, "Processor and Platform Features"),
    Key("altp2m", IG, _HVM, "Processor and Platform Features"),
    Key("altp2mhvm", IG, _HVM, "Processor and Platform Features"),
    Key("altp2m_count", IG, _HVM, "Processor and Platform Features"),
    Key("nestedhvm", IG, _HVM, "Processor and Platform Features"),
    Key("cpuid", R, "a UML guest sees the host's CPU features; they cannot be masked",
        "Processor and Platform Features", ("",)),
    Key("acpi_firmware", IG, _SMBIOS, "Processor and Platform Features"),
    Key("smbios_firmware", IG, _SMBIOS, "Processor and Platform Features"),
    Key("smbios", IG, _SMBIOS, "Processor and Platform Features"),
    Key("ms_vm_genid", IG, _HVM, "Processor and Platform Features"),
    # Guest Virtual Time Controls
    Key("tsc_mode", IG, "a UML guest reads the host's clock; there is no TSC to emulate",
        "Guest Virtual Time Controls"),
    Key("localtime", IG, _HVM + " (the emulated RTC); a PV guest keeps UTC", "Guest Virtual Time Controls"),
    Key("rtc_timeoffset", IG, _HVM + " (the emulated RTC)", "Guest Virtual Time Controls"),
    Key("vpt_align", IG, _HVM, "Guest Virtual Time Controls"),
    Key("timer_mode", IG, _HVM, "Guest Virtual Time Controls"),
    # Memory layout
    Key("mmio_hole", IG, _HVM, "Memory layout"),
    # Support for Paravirtualisation of HVM Guests
    Key("xen_platform_pci", S, "PVH and HVM: 0 leaves out the guest's xenstore link (its vsock device), which makes "
        "the domain migratable (QEMU 7.2 cannot migrate vhost-user-vsock); ignored for PV, whose xenstore link "
        "stays", "Support for Paravirtualisation of HVM Guests"),
    Key("xen_platform_pci_bar_uc", IG, _HVM, "Support for Paravirtualisation of HVM Guests"),
    Key("viridian", IG, _HVM, "Support for Paravirtualisation of HVM Guests"),
    Key("hvm_pirq", IG, _HVM, "Support for Paravirtualisation of HVM Guests"),
    # Emulated VGA Graphics Device
    Key("videoram", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("stdvga", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vga", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vnc", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vnclisten", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vncdisplay", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vncunused", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("vncpasswd", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("keymap", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("sdl", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    Key("nographic", IG, _HVM_DISPLAY, "Emulated VGA Graphics Device"),
    # Spice Graphics Support
    *(Key(k, IG, _SPICE, "Spice Graphics Support") for k in (
        "spice", "spicehost", "spiceport", "spicetls_port", "spicedisable_ticketing", "spicepasswd",
        "spiceagent_mouse", "spicevdagent", "spice_clipboard_sharing", "spiceusbredirection",
        "spice_image_compression", "spice_streaming_video")),
    # Miscellaneous Emulated Hardware
    Key("serial", IG, "an HVM or PVH domain's console is its serial port (ttyS0) already; a PV one's is its own; "
        "both are `slimvisor console`", "Miscellaneous Emulated Hardware"),
    Key("soundhw", IG, _HVM, "Miscellaneous Emulated Hardware"),
    Key("vkb_device", IG, _HVM, "Miscellaneous Emulated Hardware"),
    Key("usb", IG, _HVM, "Miscellaneous Emulated Hardware"),
    Key("usbversion", IG, _HVM, "Miscellaneous Emulated Hardware"),
    Key("usbdevice", IG, _HVM, "Miscellaneous Emulated Hardware"),
    Key("vendor_device", IG, _HVM, "Miscellaneous Emulated Hardware"),
    # Device-Model Options
    Key("device_model_version", IG, _DM, "Device-Model Options"),
    Key("device_model_override", IG, _DM, "Device-Model Options"),
    Key("stubdomain_kernel", IG, _STUBDOM, "Device-Model Options"),
    Key("stubdomain_cmdline", IG, _STUBDOM, "Device-Model Options"),
    Key("stubdomain_ramdisk", IG, _STUBDOM, "Device-Model Options"),
    Key("stubdomain_memory", IG, _STUBDOM, "Device-Model Options"),
    Key("device_model_stubdomain_override", IG, _STUBDOM, "Device-Model Options"),
    Key("device_model_stubdomain_seclabel", IG, _STUBDOM, "Device-Model Options"),
    Key("device_model_args", IG, _DM, "Device-Model Options"),
    Key("device_model_args_pv", IG, _DM, "Device-Model Options"),
    Key("device_model_args_hvm", IG, _DM, "Device-Model Options"),
    # Architecture Specific options
    *(Key(k, IG, _ARM, "ARM") for k in (
        "gic_version", "vuart", "sve", "llc_colors", "nr_spis", "trap_unmapped_accesses", "arm_sci")),
    Key("mca_caps", IG, _HVM, "x86"),
    Key("msr_relaxed", IG, "MSR access policy of the Xen hypervisor; a UML guest makes no MSR accesses", "x86"),
    # Not in xl.cfg(5): older keys that libvirt and xen-tools still write
    Key("device_model", IG, "xend's device model path; xl too ignores it (with a warning)", LEGACY),
    Key("parallel", IG, "xend's HVM parallel port; xl does not read it", LEGACY),
    Key("dhcp", IG, "xend's; xl does not read it (the guest runs its own DHCP client)", LEGACY),
    # slimvisor's own keys
    Key("vsock", S, '"cid=N,uds=PATH": a virtio-vsock device, host side on a Unix socket (Firecracker\'s scheme) '
        "[default: one for the domain's xenstore]", SLIMVISOR),
    Key("rng", S, "1: a virtio-rng device fed from the host's getrandom()", SLIMVISOR),
    Key("balloon", S, "1: a virtio-balloon device (every daemon domain has one for mem-set)", SLIMVISOR),
    Key("balloon_deflate_on_oom", S, "1: the guest may take ballooned pages back rather than OOM (implies balloon)",
        SLIMVISOR),
)  # fmt: skip

KEYS: dict[str, Key] = {k.name: k for k in TABLE}
assert len(KEYS) == len(TABLE), "a key is in the table twice"
SUPPORTED = tuple(k.name for k in TABLE if k.answer == Answer.SUPPORTED)


def counts() -> dict[Answer, int]:
    """How many xl.cfg(5) keys get each answer (slimvisor's own keys left out)."""
    out = dict.fromkeys(Answer, 0)
    for k in TABLE:
        if k.documented:
            out[k.answer] += 1
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/xlcfg.md: the table above and the notes around it."""
    n = counts()
    total = sum(n.values())
    lines = [
        "# xl.cfg keys in slimvisor",
        "",
        "<!-- Written by `python -m slimvisor.toolstack.xlkeys > docs/xlcfg.md` from slimvisor/toolstack/xlkeys.py;",
        "     tests/test_xlcfg.py checks that it is in sync. Edit the table there, not here. -->",
        "",
        f"Every one of the {total} keys documented in Xen's xl.cfg(5) has a deliberate answer: "
        f"**{n[S]} supported**, **{n[IG]} ignored** (accepted with one warning, because they have no effect here) "
        f"and **{n[R]} refused** (\"not supported by slimvisor\", with the reason). A refused key may have "
        "harmless values, listed with it, that are ignored instead (`serial = \"none\"`, an empty device list). "
        "A key in neither xl.cfg(5) nor this table (which adds slimvisor's own keys and a few older ones tools "
        "still write) is an *unknown key*, with a did-you-mean.",
        "",
        "Every error names the file and line (`node1.cfg:7: ...`), also those found after parsing "
        "(a kernel that is not User-Mode Linux, a disk image that does not exist). "
        "`slimvisor create -n CONFIG` checks a configuration as create would and prints the domain "
        "it describes as JSON, starting nothing.",
        "",
        "| key | answer | here |",
        "|-----|--------|------|",
    ]
    section = ""
    for k in TABLE:
        if k.section != section:
            section = k.section
            title = {SLIMVISOR: "slimvisor's own keys", LEGACY: "Not in xl.cfg(5): older keys tools still write"}.get(
                section, section)  # fmt: skip
            lines.append(f"| **{title}** | | |")
        answer = k.answer.value
        if k.harmless:
            shown = ", ".join(f"`{v}`" if v else 'empty (`""` or `[]`)' for v in k.harmless)
            answer += f" (ignored: {shown})"
        lines.append(f"| `{k.name}` | {answer} | {_cell(k.why)} |")
    lines += ["", DISKS_AND_CONSOLE]
    return "\n".join(lines) + "\n"


DISKS_AND_CONSOLE = """\
## Disks

Disk specifications follow xl-disk-configuration(5); every problem of a specification is reported,
not only the first.

- **Targets**: an image file, or a block device (`phy:/dev/vg/guest`, `/dev/loop0`): a block device
  is served by slimvisor's blk backend with O_DIRECT where the device allows it, its size read from
  the device (BLKGETSIZE64). The prefixes `phy:`, `file:`, `tap:`, `tap2:`, `aio:` are accepted and
  mean nothing more.
- **Formats**: `raw`, slimvisor's copy-on-write `overlay`, and `qcow2`, served by QEMU's
  qemu-storage-daemon as that disk's vhost-user-blk backend (so also `backendtype=qdisk`), started
  with the domain and stopped with it. `qcow`, `vhd` and `qed` are refused.
- **vdev**: `xvdX`, `hdX`, `sdX` and `vdX`, with partitions (`xvda1`) and gaps (`xvda`, `xvdc`).
  The guest sees its disks as virtio disks named in vdev order (`xvda` -> `/dev/vda`, `xvda1` ->
  `/dev/vdb`, `xvdc` -> `/dev/vdc`); slimvisor's boot initramfs takes `root=` in Xen's names
  (`/dev/xvda1`, `/dev/sdb`, `/dev/hda2`) for the disk the vdev names, or a partition of it, and adds
  `/dev/xvdX` names for each disk, so an /etc/fstab written for Xen works.
- **devtype=cdrom** (or `hdc:cdrom`, or `cdrom`): a read-only disk.
- Refused: `script=` and `iscsi:`/`nbd:`/`drbd:` targets, `backend=` (a driver domain), `colo*`,
  `direct-io-safe`, `discard`/`no-discard` options (discard is always offered).

## Console

A domain's console is `slimvisor console NAME`. Xen PV guests name it `hvc0` (or `xvc0` in old
kernels): `console=hvc0` or `console=xvc0` in `extra=` or `cmdline=` is given to the kernel as the
engine's console (`tty0` for User-Mode Linux).
"""


if __name__ == "__main__":
    print(render_markdown(), end="")
