"""The command line: help lists the subcommands, chat answers, quantize writes a checkpoint LLM loads."""
import pytest

from quantkit import LLM, SamplingParams
from quantkit.cli import _engine_kwargs, build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("chat", "generate", "quantize"))


def test_chat_answers(capsys):
    assert main(["chat", "smollm2-135m", "--device", "cpu", "--max-tokens", "12",
                 "--kv-cache-memory-gb", "0.05", "-m", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["chat", "generate", "serve", "eval"])
def test_async_scheduling_flag_reaches_the_engine_kwargs(command):
    parser = build_parser()
    for flags, expected in ([], True), (["--no-async-scheduling"], False), (["--async-scheduling"], True):
        assert _engine_kwargs(parser.parse_args([command, "smollm2-135m", *flags]))["async_scheduling"] is expected


@pytest.mark.parametrize("method, extra", [("nf4", []), ("rtn", ["--format", "awq", "--group-size", "64"])])
def test_quantize_writes_a_loadable_checkpoint(tmp_path, method, extra):
    out = tmp_path / method
    assert main(["quantize", "smollm2-135m", "--method", method, "--out", str(out), *extra]) == 0
    llm = LLM(str(out), device="cpu", num_kv_blocks=16, max_model_len=128)
    expected = {"nf4": "bitsandbytes", "rtn": "awq"}[method]
    assert llm.llm_engine.model_config.quantization_config["quant_method"] == expected
    text = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=8),
                    use_tqdm=False)[0].outputs[0].text
    assert text.strip()


def test_quantize_errors_are_clear(tmp_path, capsys):
    assert main(["quantize", "smollm2-135m", "--method", "awq", "--bits", "8", "--out", str(tmp_path / "x")]) == 2
    assert "writes (4,) bits" in capsys.readouterr().err
    # group_size must divide every input width; 128 does not divide 576: refused before any work, nothing written
    assert main(["quantize", "--model", "smollm2-135m", "--method", "awq", "--output", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "q/k/v_proj, gate/up_proj (in_features 576)" in err and not (tmp_path / "y").exists()
    assert main(["chat", "no-such-model", "--device", "cpu"]) == 2
    assert "never downloads" in capsys.readouterr().err
