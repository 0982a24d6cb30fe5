"""Which accelerator runs unmodified guests on this host: KVM where the CPU has VMX/SVM, else TCG.

"/dev/kvm opens" is not the test: on hosts without VMX/SVM it may be PVM (module kvm_pvm), a
software hypervisor that runs only PVM-built guest kernels; QEMU dies there with KVM emulation
failures on an unmodified kernel (FIELD-NOTES). So KVM is chosen only with a hardware module
loaded and the CPU flag it needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_MODULE = Path("/sys/module")
HARDWARE_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm"}


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str

    def args(self) -> list[str]:
        """QEMU's -accel and -cpu for it. TCG: one host thread per vCPU, and a bounded translation
        cache (QEMU's default reserves 1 GiB, which a domain's memory limit would have to cover)."""
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_MIB}", "-cpu", "max"]


TCG_TB_MIB = 64


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, which is also the guest's under TCG (QEMU reads the host TSC)."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return None


def tcg_boot_args() -> str:
    """Kernel arguments a Linux guest needs on QEMU's microvm under TCG.

    microvm has no HPET or ACPI PM timer, so the kernel calibrates the TSC against the PIT alone;
    on a busy host TCG is too uneven for that ("tsc: Unable to calibrate against PIT"), the TSC is
    marked unstable and the boot hangs before the first timer tick. Telling it the frequency
    skips the calibration. A frequency that is off only makes the guest's clock run off.
    """
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def choose(sys_module: Path = SYS_MODULE, cpuinfo: str | None = None, dev_kvm: str = "/dev/kvm") -> Accel:
    """The accelerator for HVM/PVH domains here, with the reason `slimvisor info` shows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = cpu_flags(cpuinfo)
    if (sys_module / "kvm_pvm").exists():
        return Accel("tcg", "/dev/kvm is PVM (module kvm_pvm): it runs only PVM-built guest kernels")
    for module, flag in HARDWARE_MODULES.items():
        if (sys_module / module).exists() and flag in flags:
            if not os.access(dev_kvm, os.R_OK | os.W_OK):
                return Accel("tcg", f"{module} is loaded but {dev_kvm} cannot be opened")
            return Accel("kvm", f"{module} is loaded and the CPU has {flag}")
    if not flags & set(HARDWARE_MODULES.values()):
        return Accel("tcg", "the CPU has no VMX or SVM")
    return Accel("tcg", "no kvm_intel or kvm_amd module loaded")
