import subprocess
import sys

from immunize.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("models", "data", "env"):
        assert f"  {name} " in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_data_command_reports_every_dataset(capsys, real_data_root):
    assert main(["data", "--data_root", str(real_data_root), "--verify_checksums", "false"]) == 0
    out = capsys.readouterr().out
    assert "beavertails/qa.jsonl" in out and "10306" in out and "refusal bank" in out


def test_data_command_fails_on_malformed_file(capsys, small_data_root):
    bad = '{"prompt": "x", "category": "animal_abuse"}\n[1]\n'
    (small_data_root / "beavertails/eval_prompts.jsonl").write_text(bad)
    assert main(["data", "--data_root", str(small_data_root), "--splits", "false"]) == 1
    assert "eval_prompts.jsonl:2: expected a JSON object" in capsys.readouterr().out


def test_bad_option_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "immunize", "data", "--data_root", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "data root not found" in proc.stderr


def test_models_and_env_commands(capsys, isolated_cache):
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["env"]) == 0
    assert "transformers" in capsys.readouterr().out
