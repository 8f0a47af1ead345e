#!/usr/bin/env python3
"""Fails when a file includes a header of a layer above its own (docs/DESIGN.md section 2).

Each layer may include its own headers and those of the layers it lists; the CMake targets link
the same way, so an include that breaks the order would also be a link-order bug."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# folder -> the include prefixes its files may use
ALLOWED = {
    "io": {"io"},
    "kernels": {"kernels"},
    "src/config": {"config", "io", "kernels"},
    "src/model": {"model", "config", "io", "kernels"},
    "src/parallel": {"parallel", "model", "config", "io", "kernels"},
    "src/data": {"data", "io"},
    "src/train": {"train", "parallel", "model", "data", "config", "io", "kernels"},
    "src/cli": {"cli", "train", "parallel", "model", "data", "config", "io", "kernels"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([a-z_]+)/')

def main() -> int:
    bad = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in {".h", ".cpp", ".cu", ".cuh"}:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                m = INCLUDE.match(line)
                if m and m.group(1) not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: {folder} may not include "
                               f"{m.group(1)}/ (allowed: {', '.join(sorted(allowed))})")
    for b in bad:
        print(b)
    print(f"check_layers: {len(bad)} include(s) against the layer order")
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main())
