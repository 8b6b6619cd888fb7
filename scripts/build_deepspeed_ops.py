"""Build DeepSpeed's CPU shared-memory comm op ahead of time (`make test` runs this before the suite).

DeepSpeed on the CPU accelerator (the suite's ZeRO runs, over gloo) JIT-compiles this op at its first start:
53 CPU s here (31 s wall, both cores), which the first DeepSpeed test otherwise paid while sharing the cores
with the other test process (tests/test_deepspeed_bf16.py: 44 s with the op built, 95–135 s in fresh clones).
The op lands in TORCH_EXTENSIONS_DIR, where the tests and the demo look (.torch_extensions); a current build
is reused. With a GPU accelerator DeepSpeed builds no such op and this does nothing.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        print("build_deepspeed_ops: set TORCH_EXTENSIONS_DIR (make test sets .torch_extensions)", file=sys.stderr)
        return 2
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print(f"DeepSpeed's {get_accelerator().device_name()} accelerator has no shared-memory comm op to build")
        return 0
    builder.load()  # compiles into TORCH_EXTENSIONS_DIR, or finds the current build there
    print(f"DeepSpeed {builder.NAME} op ready in {os.environ['TORCH_EXTENSIONS_DIR']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
