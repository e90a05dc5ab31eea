"""Fuzzing the fast-join record parser of the uctr-exec C front (launchers/c/fastrec.c).

Two runs, both bounded and deterministic (fixed seeds, fixed counts: the same inputs in CI
every time):
  * the C driver launchers/c/fastrec_fuzz.c, built with AddressSanitizer and UBSan, mutates
    the seed corpus (tests/fuzz/corpus/fastrec/) 15,000 times and runs the parser, the
    request check and the env program on each input: any memory error or undefined
    behaviour aborts it;
  * a differential run: Python mutates the seeds, and the C parser (fastrec-tool, ASan+UBSan)
    and the reference parser (uctr_batch.launch.fastrec.parse) must accept and refuse the
    same inputs and read the same fields from the accepted ones.
The seeds are records the Python writer wrote (tests/unit/test_fastrec.py, record_lines)."""

import random
import subprocess
from pathlib import Path

import pytest

from tests.harness import cfront
from uctr_batch.launch import fastrec

CORPUS = Path(__file__).resolve().parent / "corpus" / "fastrec"
SEEDS = sorted(CORPUS.iterdir())
pytestmark = pytest.mark.skipif(cfront.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return cfront.build(tmp_path_factory.mktemp("cfront"), ("fastrec-tool", "fastrec-fuzz"))


def test_seeds_are_valid_records():
    assert len(SEEDS) >= 3
    for seed in SEEDS:
        fastrec.parse(seed.read_bytes())


def test_c_driver_survives_mutations_under_asan_and_ubsan(built):
    proc = subprocess.run([str(built["fastrec-fuzz"]), "15000", "12", *map(str, SEEDS)],
                          capture_output=True, text=True, env=cfront.SAN_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    iterations, accepted = proc.stdout.split()[0], int(proc.stdout.split()[2])
    assert iterations == "15000" and accepted > 0  # the mutations also reach valid records


def mutate(rng: random.Random, data: bytes, seeds) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(data))
        choice = rng.randrange(7)
        if choice == 0 and data:
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif choice == 1:
            data[pos:pos] = rng.choice([b" ", b"\n", b"%", b"%-", b"%00", b"%zz", b"%4",
                                        b"%41", b"end\n", b"\xff", b"\t", b"%+1", b"  "])
        elif choice == 2:
            del data[pos:pos + rng.randint(1, 12)]
        elif choice == 3:
            lines = bytes(data).split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            data = bytearray(b"\n".join(lines))
        elif choice == 4:
            data = data[:pos]
        elif choice == 5:
            other = rng.choice(seeds)
            data = data[:pos] + other[rng.randrange(len(other)):]
        elif data:
            data[pos % len(data)] = rng.randrange(256)
    return bytes(data)


def python_verdict(data: bytes):
    try:
        return [(n, list(a)) for n, a in fastrec.parse(data)]
    except (ValueError, UnicodeDecodeError):
        return None


def test_c_and_python_parsers_agree_on_mutated_records(built, tmp_path):
    rng = random.Random(2026)
    seeds = [s.read_bytes() for s in SEEDS]
    inputs = [mutate(rng, rng.choice(seeds), seeds) for _ in range(400)] + seeds
    paths = []
    for i, data in enumerate(inputs):
        path = tmp_path / f"m{i:04d}.rec"
        path.write_bytes(data)
        paths.append(path)
    proc = subprocess.run([str(built["fastrec-tool"]), "parse", *map(str, paths)],
                          capture_output=True, text=True, env=cfront.SAN_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    verdicts = iter(proc.stdout.splitlines())
    accepted = 0
    for data in inputs:
        head = next(verdicts)
        expected = python_verdict(data)
        if head.startswith("refused"):
            assert expected is None, (data, head)
            continue
        assert head == "ok"
        lines = []
        for line in iter(lambda: next(verdicts), "--"):
            name, *args = line.split(" ")
            lines.append((name, [bytes.fromhex(a if a != "-" else "").decode(
                "utf-8", "surrogateescape") for a in args]))
        assert lines == expected, data
        accepted += 1
    assert accepted > len(seeds)  # some mutants are valid records: the comparison bites
