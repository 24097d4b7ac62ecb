"""Long seeded mutation fuzz of the GGUF reader (glmtg/loading/gguf.py); CI runs a 300-mutant version.

    python bench/gguf_fuzz.py [--mutants 20000] [--seed 15]   # -> bench/results/gguf_fuzz/<date>-fuzz.{json,md}

Seed files: one written by gguf.GGUFWriter (every metadata value type, string and nested arrays, F32/F16/
Q8_0/Q4_0/Q4_K tensors) and one with ``general.alignment = 1``. Each mutant applies 1-8 edits (half of them
one): bit flips,
random bytes, interesting 4/8-byte integers (0, 2**31, 2**63, 2**64-1 ...), byte insertion or deletion,
or truncation; 90% of the edits land before the data section, where the structure is. Every outcome
must be a clean open whose tensors all lie inside the file without overlapping, or a GGUFError with a
one-line message; anything else (another exception, a broken invariant) is recorded with the mutant's
index so that it can be replayed. CPU only; needs the ``gguf`` package (the test extra).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, result_path, write_json  # noqa: E402

from glmtg.formats.ggml_types import GGML_TYPES  # noqa: E402
from glmtg.loading.gguf import GGUFError, open_gguf  # noqa: E402

INTERESTING = [0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63, 2**64 - 1]


def seed_files(folder: str) -> dict[str, bytes]:
    import gguf

    q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    out = {}
    for label, alignment in (("writer", None), ("align1", 1)):
        path = os.path.join(folder, f"{label}.gguf")
        w = gguf.GGUFWriter(path, "glm4moe")
        if alignment:
            w.add_custom_alignment(alignment)
        w.add_uint8("t.u8", 7)
        w.add_int16("t.i16", -3)
        w.add_uint32("glm4moe.block_count", 47)
        w.add_int64("t.i64", -(2**40))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "GLM ✓")
        w.add_array("tokenizer.ggml.tokens", ["<|endoftext|>", "Ġthe", "é", "a", "b"])
        w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_tensor("f32", rng.standard_normal((2, 8)).astype(np.float32))
        w.add_tensor("f16", rng.standard_normal((3, 1, 5)).astype(np.float16))
        for qt, shape in ((q.Q8_0, (2, 32)), (q.Q4_0, (1, 64))):
            w.add_tensor(qt.name, gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qt), raw_dtype=qt)
        w.add_tensor("Q4_K", rng.integers(0, 256, (1, 144), dtype=np.uint8), raw_dtype=q.Q4_K)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[label] = Path(path).read_bytes()
    return out


def mutate(data: bytes, rng: random.Random, hot_end: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 4, 8))):  # mostly single edits, which often still open
        if not out:
            break
        pos = rng.randrange(min(hot_end, len(out)) if rng.random() < 0.9 else len(out))
        kind = rng.randrange(6)
        if kind == 0:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[pos] = rng.randrange(256)
        elif kind == 2:
            width = rng.choice((4, 8))
            value = rng.choice(INTERESTING + [rng.randrange(len(out) * 2)]) % (1 << (8 * width))
            out[pos : pos + width] = value.to_bytes(width, "little")[: len(out) - pos]
        elif kind == 3:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 4:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            del out[pos:]
    return bytes(out)


def check_clean_open(path: str) -> int:
    """Open and check every invariant a clean open promises; returns the tensor count."""
    with open_gguf(path) as f:
        sizes = [os.path.getsize(p) for p in f.paths]
        spans = []
        for name, t in f.tensors.items():
            g = GGML_TYPES[t.ggml_type]
            assert t.name == name and t.shape == t.ne[::-1] and 1 <= len(t.ne) <= 4 and min(t.ne) >= 0
            assert t.nbytes == int(np.prod(t.ne, dtype=object)) // g.block_size * g.type_size
            assert t.offset + t.nbytes <= sizes[t.part] and f.tensor_bytes(name).size == t.nbytes
            if t.nbytes:
                spans.append((t.part, t.offset, t.offset + t.nbytes))
        spans.sort()
        assert all(a[0] < b[0] or a[2] <= b[1] for a, b in itertools.pairwise(spans)), "overlap"
        return len(f.tensors)


def error_class(msg: str, path: str) -> str:
    """The message without the file, quoted names, numbers: groups errors by the check that fired."""
    msg = msg.removeprefix(path + ": ")
    msg = re.sub(r"""('[^']*'|"[^"]*")(\[\d+\])*""", "'…'", msg)
    msg = re.sub(r"#\d+", "#N", msg)
    return re.sub(r"(?<![\w-])-?\d+", "N", msg)  # keeps UTF-8 and int64


def run(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    failures: list[dict] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as folder:
        seeds = seed_files(folder)
        hot = {}
        for label, data in seeds.items():
            with open_gguf(os.path.join(folder, f"{label}.gguf")) as f:
                hot[label] = min(t.offset for t in f.tensors.values())
        path = os.path.join(folder, "mutant.gguf")
        start = time.perf_counter()
        for i in range(n):
            label = rng.choice(sorted(seeds))
            Path(path).write_bytes(mutate(seeds[label], rng, hot[label]))
            try:
                check_clean_open(path)
                outcomes["clean open"] += 1
            except GGUFError as e:
                msg = str(e)
                if "\n" in msg or not msg.startswith(path):
                    failures.append({"mutant": i, "seed_file": label, "problem": f"badly formed message: {msg!r}"})
                outcomes["GGUFError"] += 1
                errors[error_class(msg, path)] += 1
            except BaseException as e:  # noqa: BLE001 - anything else is the finding
                outcomes["other"] += 1
                failures.append({"mutant": i, "seed_file": label, "problem": f"{type(e).__name__}: {e}",
                                 "where": traceback.format_exc(limit=-2)})
        seconds = time.perf_counter() - start
    return {
        "environment": environment(), "mutants": n, "seed": seed, "seed_files": sorted(seeds),
        "seconds": seconds, "peak_rss_mib_before": rss_before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "outcomes": dict(outcomes), "failures": failures, "error_classes": dict(errors.most_common()),
    }


def markdown(r: dict) -> str:
    o = r["outcomes"]
    lines = [
        f"# GGUF reader mutation fuzz ({r['environment']['date']})", "",
        f"`python bench/gguf_fuzz.py --mutants {r['mutants']} --seed {r['seed']}`: {r['mutants']} mutants of "
        f"{len(r['seed_files'])} seed files in {r['seconds']:.1f} s ({1e3 * r['seconds'] / r['mutants']:.2f} ms each, "
        f"write + open + checks); peak RSS {r['peak_rss_mib']:.0f} MiB after the run, "
        f"{r['peak_rss_mib_before']:.0f} MiB before it (the imports).", "",
        f"- clean opens (every tensor inside its file, no overlaps): {o.get('clean open', 0)}",
        f"- GGUFError (one line, naming the file): {o.get('GGUFError', 0)}",
        f"- anything else: {o.get('other', 0)}; failures recorded: {len(r['failures'])}", "",
        "| errors | check that fired (names and numbers elided) |", "|---|---|",
    ]
    lines += [f"| {count} | {cls.replace('|', '/')} |" for cls, count in r["error_classes"].items()]
    for f in r["failures"][:20]:
        lines.append(f"\nFAILURE mutant {f['mutant']} ({f['seed_file']}): {f['problem']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=int, default=20000)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the .md goes beside it)")
    args = p.parse_args()
    if args.mutants < 1:
        p.error("--mutants must be at least 1")
    r = run(args.mutants, args.seed)
    out = args.out or result_path("gguf_fuzz", "fuzz", ".json")
    write_json(out, r)
    out.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))
    sys.exit(1 if r["failures"] else 0)


if __name__ == "__main__":
    main()
