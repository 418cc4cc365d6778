"""The command line's manners: usage errors in one line naming the flag typed, help that shows the defaults, and
help that imports only what the subcommand uses (benchmarks/cli_startup.py measures the time)."""

import argparse
import json
import subprocess
import sys

import pytest
from PIL import Image

from mlx_blip2.cli import COMMANDS, build_parser, main

# Loaded by a subcommand's work, never by its --help: MLX, the web stack, the library machinery, torch, PIL, numpy.
HEAVY = ("mlx.core", "fastapi", "uvicorn", "torch", "transformers", "mlx_lm", "mlx_blip2.library",
         "mlx_blip2.library.distributed", "mlx_blip2.pipelines", "mlx_blip2.models", "mlx_blip2.server.app",
         "PIL.Image", "numpy")


def modules_after(argv: list[str]) -> list[str]:
    """The modules a fresh interpreter holds after ``mlx-blip2 ARGV`` (which exits on its own)."""
    code = ("import sys, io, contextlib\nfrom mlx_blip2.cli import main\n"
            "try:\n    with contextlib.redirect_stdout(io.StringIO()):\n        main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nimport json\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["ask", "--help"], ["doctor", "--help"],
                                  ["duplicates", "--help"], ["eval", "--help"], ["finetune", "--help"]])
def test_help_and_usage_errors_import_only_what_they_use(argv):
    loaded = set(modules_after(argv))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    if argv == ["--help"]:  # no subcommand's module either
        assert not any(m.startswith("mlx_blip2.cli.") for m in loaded), sorted(loaded)


@pytest.mark.parametrize("argv", [["caption", "--help"], ["caption", "--temperature", "hot", "x.png"],
                                  ["index", "--help"], ["search", "--help"]])
def test_library_commands_answer_help_without_model_code(argv):
    """The library commands still read their option tables through PIL/numpy-importing modules, but never load
    MLX, torch or the model code for a help text or a usage error."""
    loaded = set(modules_after(argv))
    model_code = {"mlx.core", "torch", "transformers", "mlx_lm", "mlx_blip2.pipelines", "mlx_blip2.models",
                  "fastapi"}
    assert not loaded & model_code, sorted(loaded & model_code)


def test_the_summaries_are_each_modules_own(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert helps == COMMANDS
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} {summary}" in out for name, summary in COMMANDS.items()), out


@pytest.mark.parametrize("argv, words", [
    (["caption", "x.png", "--temperature", "hot"], ["--temperature", "invalid float value: 'hot'"]),
    (["caption", "x.png", "--shard", "4/3"], ["--shard", "4/3"]),
    (["caption", "x.png", "--max-new-tokens", "0"], ["--max-new-tokens", "[1, inf)", "got 0"]),
    (["ask", "x.png", "what?", "--top-p", "2"], ["--top-p", "(0, 1]"]),
    (["serve", "--port", "eighty"], ["--port", "eighty"]),
    (["caption", "--num-beams", "three"], ["--num-beams", "three"]),
])
def test_a_usage_error_is_one_line_naming_the_flag(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mlx-blip2 {argv[0]}: error: argument "), err
    for w in words:
        assert w in err, err
    assert "usage:" not in err


def test_option_combinations_are_reported_by_their_flags(capsys):
    assert main(["ask", "x.png", "q", "--min-new-tokens", "9", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --min-new-tokens (9) must not exceed --max-new-tokens (3)\n"


def test_serve_help_shows_every_default(capsys):
    parser = build_parser(["serve"])
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    for action in serve._actions:
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "largest max_new_tokens a request may ask for (default: 512)" in help_text


def test_stream_reports_a_real_peak_memory(tmp_path):
    """``ask --stream`` on the CPU: MLX's peak and the process's peak resident size, never "0.00 GB"."""
    import re

    from conftest import FIXTURES
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    out = subprocess.run([sys.executable, "-m", "mlx_blip2", "ask", str(image), "what?", "--stream", "-m",
                          str(FIXTURES / "tiny-blip2-opt"), "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    match = re.search(r"peak memory: ([\d.]+) (MB|GB) in MLX arrays, ([\d.]+) (MB|GB) process peak \(max RSS\)",
                      line)
    assert match, line
    mlx_mb = float(match[1]) * (1000 if match[2] == "GB" else 1)
    rss_mb = float(match[3]) * (1000 if match[4] == "GB" else 1)
    assert mlx_mb > 0 and rss_mb > 50 and rss_mb > mlx_mb, line


# --- precision on the CPU ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    from conftest import FIXTURES

    from mlx_blip2.convert import convert

    return convert(FIXTURES / "tiny-blip2-opt", tmp_path_factory.mktemp("q4") / "tiny-q4", quantize=True, q_bits=4,
                   q_group_size=32)


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mlx_blip2" and r.getMessage().startswith("note:")]


def test_a_slow_precision_on_the_cpu_gets_one_line(quantized_tiny, caplog):
    import mlx.core as mx
    from conftest import FIXTURES

    from mlx_blip2.models.quant import dequantize_at_load, precision
    from mlx_blip2.pipelines import load

    pipe = load(quantized_tiny)
    (note,) = notes(caplog)
    assert "4-bit" in note and "--dtype float32" in note and "\n" not in note
    caplog.clear()
    load(FIXTURES / "tiny-blip2-opt", dtype=mx.float16)
    (note,) = notes(caplog)
    assert note.startswith("note: float16 weights on the CPU") and "--dtype float32" in note
    caplog.clear()
    load(FIXTURES / "tiny-blip2-opt")
    assert notes(caplog) == []
    # --dtype float32: dequantized once at load, the same captions, no note.
    with dequantize_at_load():
        floats = load(quantized_tiny, dtype=mx.float32)
    assert notes(caplog) == [] and precision(floats.model) == (None, mx.float32)
    assert precision(pipe.model)[0] == 4
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    assert floats.caption(image, max_new_tokens=5) == pipe.caption(image, max_new_tokens=5)


def test_the_command_line_dequantizes_with_dtype_float32(quantized_tiny, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    base = [sys.executable, "-m", "mlx_blip2", "caption", str(image), "-m", str(quantized_tiny), "--max-new-tokens",
            "3"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    as_float = subprocess.run(base + ["--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == as_float.returncode == 0, (plain.stderr, as_float.stderr)
    assert [line for line in plain.stderr.splitlines() if line.startswith("note:")] == [
        next(line for line in plain.stderr.splitlines() if "4-bit model runs on the CPU" in line)]
    assert "note:" not in as_float.stderr
    assert plain.stdout == as_float.stdout  # the same caption
    doctor = subprocess.run([sys.executable, "-m", "mlx_blip2", "doctor", "-m", str(quantized_tiny)],
                            capture_output=True, text=True, timeout=120)
    assert "only float32 runs at BLAS speed" in doctor.stdout
    assert "stored 4-bit quantized - slow on this CPU; load it with --dtype float32" in doctor.stdout
