"""No kernel from the Hugging Face Hub at run time unless asked (docs/known-issues.md #16).

On a CPU with AVX512-BF16, `import bitsandbytes` (peft imports it, so every `marl` command does) asks the
`kernels` package for `kernels-community/quantization-bitsandbytes` from the Hub. That prints "Skipping
publisher trust check ..." (offline) and "Failed to load CPU gemm_4bit_forward ..." (when it fails), and
would run downloaded code if it succeeded. marl refuses that
one request before bitsandbytes makes it, and drops bitsandbytes' warning about the refusal; bitsandbytes
then uses its own compiled CPU code, as it does whenever the request fails. `MARL_HUB_KERNELS=1` lets the
request through (bitsandbytes' own behaviour).

`install()` (run by `import marl`) only adds an import hook: nothing is imported until bitsandbytes is.
A program that imported bitsandbytes (or peft) before marl has already made the request.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys

ENV = "MARL_HUB_KERNELS"
BITSANDBYTES_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # where bitsandbytes logs a kernel it could not load


class HubKernelRefused(RuntimeError):
    """What `kernels.get_kernel` raises for bitsandbytes' CPU kernel unless MARL_HUB_KERNELS is set."""


def hub_kernels_allowed() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _drop_refusal(record: logging.LogRecord) -> bool:
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning, when the failure is marl's refusal."""
    return not any(isinstance(a, HubKernelRefused) for a in (record.args or ()))


_patched = False


def refuse_bitsandbytes_cpu_kernel() -> None:
    """Make `kernels.get_kernel` refuse bitsandbytes' CPU kernel (while MARL_HUB_KERNELS is unset) and
    silence bitsandbytes' warning about that refusal. Once per process; nothing without `kernels`."""
    global _patched
    if _patched or hub_kernels_allowed():
        return
    _patched = True
    try:
        import kernels
    except ImportError:  # bitsandbytes then asks for nothing
        return
    ask_hub = kernels.get_kernel

    def get_kernel(repo_id, *args, **kwargs):
        if repo_id == BITSANDBYTES_CPU_KERNEL and not hub_kernels_allowed():
            raise HubKernelRefused(f"marl loads no kernel from the Hub ({ENV}=1 allows it)")
        return ask_hub(repo_id, *args, **kwargs)

    kernels.get_kernel = get_kernel
    logging.getLogger(_BNB_CPU_LOGGER).addFilter(_drop_refusal)


class _BeforeBitsandbytes(importlib.abc.MetaPathFinder):
    """Runs `refuse_bitsandbytes_cpu_kernel` when bitsandbytes is first imported; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":
            refuse_bitsandbytes_cpu_kernel()
        return None


def install() -> None:
    """Add the import hook (once), unless bitsandbytes is already imported or MARL_HUB_KERNELS is set."""
    if hub_kernels_allowed() or "bitsandbytes" in sys.modules:
        return
    if not any(isinstance(f, _BeforeBitsandbytes) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeBitsandbytes())
