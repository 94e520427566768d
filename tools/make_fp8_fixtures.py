#!/usr/bin/env python3
"""Writes tests/fixtures/fp8_e4m3.safetensors: float32 values and their e4m3 ("E4M3FN") bytes as
ml_dtypes (the JAX team's NumPy float8 types) rounds them, stored as float32 0..255. The values
cover every e4m3 value, every midpoint between neighbours (the ties), values just off them,
subnormals, and log-uniform magnitudes up to 460; ml_dtypes turns values of 464 and more into NaN
where our conversion saturates at 448, so none are here (tests/ops_cpu.rs checks saturation).

Run: python3 tools/make_fp8_fixtures.py   (needs numpy, ml_dtypes, safetensors)
"""
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(20261205)
codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
finite = np.unique(codes[np.isfinite(codes) & (codes >= 0)])
mids = (finite[:-1] + finite[1:]) / 2
off = np.concatenate([mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
logu = np.exp2(rng.uniform(-14, np.log2(460), 2000)).astype(np.float32)
tiny = rng.uniform(0, 2.0**-6, 300).astype(np.float32)
pos = np.concatenate([finite, mids, off, logu, tiny, [0.0, 2.0**-10, 3 * 2.0**-11, 460.0]]).astype(np.float32)
values = np.concatenate([pos, -pos]).astype(np.float32)
values = values[np.abs(values) < 464]
e4m3 = values.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.float32)

path = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fp8_e4m3.safetensors"
save_file({"values": values, "e4m3": e4m3}, str(path))
print(f"wrote {path} ({len(values)} values)")
