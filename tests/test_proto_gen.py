import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_grpc_code_matches_proto(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = tmp_path / "service" / "proto_gen"
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert files, "the script generated nothing"
    stale = [
        str(f)
        for f in files
        if not filecmp.cmp(generated / f, ROOT / "service" / "proto_gen" / f, shallow=False)
    ]
    assert not stale, f"run scripts/gen_proto.sh: out of date: {stale}"
