"""The benchmark runs end to end on tiny sizes (what it measures is not asserted: timing is for bench/)."""
import json
import math
import subprocess
import sys

import numpy

from bench.run import GPU_SIZES, TINY, main


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--tiny", "--repeats", "2", "--warmup", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["results"]) == set(TINY) - set(GPU_SIZES)  # those run by default on a GPU only
    for row in results["results"].values():
        assert row["mnn_ms"] > 0 and row["torch_ms"] > 0 and row["gflop_per_step"] > 0
        assert row["mnn_peak_mb"] >= 0 and row["torch_peak_mb"] >= 0
    table = capsys.readouterr().out
    assert "| mlp-64 |" in table and "| gpt-12 |" in table and "| lstm |" in table and "GEMM" in table


def test_the_gpu_sizes_run_where_asked_for(capsys):
    assert main(["--tiny", "--no-memory", "--repeats", "1", "--warmup", "0", "--models", ",".join(GPU_SIZES)]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in GPU_SIZES)


def test_mnn_bench_command(tmp_path, capsys):
    from mnn import cli
    assert cli.main(["bench", "--tiny", "--no-memory", "--repeats", "1", "--warmup", "0", "--models", "mlp-64",
                     "--json", str(tmp_path / "r.json")]) == 0
    assert "| mlp-64 |" in capsys.readouterr().out


def test_nanogpt_reference_learns_in_a_few_steps():
    """The PyTorch yardstick for the GPT runs end to end, and its loss starts at log(vocabulary) and falls."""
    from bench.nanogpt_reference import CONFIG, train
    from test_gpt import SHAKESPEARE
    text = SHAKESPEARE.read_text()[:20000]
    config = {**CONFIG, "warmup": 2, "eval_interval": 10, "eval_iters": 2, "layers": 1, "width": 16, "heads": 2,
              "context": 16, "device": "cpu", "label": ""}
    _, untrained = train(text, 0, {**config, "iters": 0})
    estimate, trained = train(text, 0, {**config, "iters": 30})
    assert abs(untrained - math.log(len(set(text)))) < 0.05
    assert trained < untrained - 0.1 and abs(estimate - trained) < 0.1
    _, dropped_out = train(text, 0, {**config, "iters": 30, "dropout": 0.2})  # nanoGPT's GPU run drops out
    assert dropped_out < untrained - 0.1 and dropped_out != trained


def test_nanogpt_reference_presets_change_only_known_settings():
    from bench.nanogpt_reference import CONFIG, PRESETS
    assert PRESETS["cpu"] == {} and set(PRESETS["gpu"]) <= set(CONFIG)
    assert (PRESETS["gpu"]["width"], PRESETS["gpu"]["context"], PRESETS["gpu"]["dropout"]) == (384, 256, 0.2)


def test_a_bad_attention_in_the_environment_is_one_line(monkeypatch, capsys):
    from mnn import cli
    monkeypatch.setenv("MNN_ATTENTION", "fast")
    try:
        code = cli.main(["bench", "--tiny"])
    except SystemExit as stopped:
        code = stopped.code
    err = capsys.readouterr().err
    assert code == 2 and "MNN_ATTENTION='fast'" in err and "Traceback" not in err


def test_bad_benchmark_flags_are_one_line(tmp_path, capsys):
    import torch

    from mnn import cli
    cases = [(["--threads", "0"], "--threads: must be an integer in [1, 1024]"),
             (["--repeats", "0"], "--repeats: must be an integer >= 1"),
             (["--warmup", "-1"], "--warmup: must be an integer >= 0"),
             (["--models", "nonsense"], "no case 'nonsense'"),
             (["--json", str(tmp_path / "missing" / "r.json")], "no folder"),
             (["--json", str(tmp_path)], "is a folder; name a file in it")]  # told before the run, not after
    cases += [] if torch.cuda.is_available() else [(["--device", "cuda"], "torch sees no CUDA GPU")]
    cases += [(["--attention", "fast"], "invalid choice: 'fast'")]
    for flags, message in cases:
        try:
            code = cli.main(["bench", "--tiny", *flags])
        except SystemExit as stopped:  # argparse's own errors
            code = stopped.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, flags


def test_the_profile_charges_each_layer_its_own_time():
    """A fake clock that only moves when a layer works: a composite layer is charged what its body does
    not account for, and each leaf its own calls."""
    from bench.profile import LayerClock
    from mnn import SequentialLayers
    from mnn.layers import ReluLayer, ResidualBlock

    ticks = [0.0]
    clock = LayerClock(sync=lambda: None, now=lambda: ticks[0])

    class SlowRelu(ReluLayer):
        def forward(self, x):
            ticks[0] += 3.0
            return super().forward(x)

    class SlowResidual(ResidualBlock):
        def forward(self, x):
            ticks[0] += 1.0  # its own work, beside its body's
            return super().forward(x)

    net = SequentialLayers([SlowResidual(SequentialLayers([SlowRelu(), SlowRelu()])), SlowRelu()])
    clock.watch(net)
    net.forward(numpy.ones((2, 3)))
    assert clock.seconds[("SlowRelu", "forward")] == 9.0 and clock.calls[("SlowRelu", "forward")] == 3
    assert clock.seconds[("SlowResidual", "forward")] == 1.0
    assert clock.seconds[("SequentialLayers", "forward")] == 0.0 and clock.calls[("SequentialLayers", "forward")] == 2


def test_the_profile_runs_end_to_end(tmp_path, capsys):
    from bench.profile import main as profile
    out = tmp_path / "profile.json"
    assert profile(["--tiny", "--steps", "1", "--warmup", "0", "--models", "gpt-12,cnn-128", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {"LinearLayer.backward", "LayerNormLayer.forward", "optimizer.step"} <= set(results["gpt-12"]["parts_ms"])
    assert {"Conv2dLayer.backward", "MaxPool2dLayer.forward"} <= set(results["cnn-128"]["parts_ms"])
    assert all(ms >= 0 for case in results.values() for ms in case["parts_ms"].values())
    assert "| Conv2dLayer | backward |" in capsys.readouterr().out


def test_outside_the_repository_bench_help_says_where_it_runs(tmp_path):
    script = "import sys; from mnn import cli; sys.exit(cli.main(sys.argv[1:]))"
    for flags, code, stream, text in ((["--help"], 0, "stdout", "It runs from a clone of mnn's repository"),
                                      (["--repeats", "1"], 2, "stderr", "run it from the repository root")):
        ran = subprocess.run([sys.executable, "-c", script, "bench", *flags], cwd=tmp_path, capture_output=True,
                             text=True)
        assert ran.returncode == code and text in getattr(ran, stream), (flags, ran)
