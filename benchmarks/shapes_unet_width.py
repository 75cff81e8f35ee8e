"""Is the shapes teacher's UNet compute-bound on this CPU? `python benchmarks/shapes_unet_width.py`.

One UNet call at batch 2 (classifier-free guidance: 4x16x16 latents, 77 text tokens) of the zoo
teacher's architecture at full width and at half the channels (every block, the cross-attention
width and the head count kept), under torch eager and ONNX Runtime, timed round-robin in one window
(these machines drift, and other processes share the cores). MACs per call from torch's counter.
Writes `benchmarks/results/shapes_unet_width.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from deploykit.bench.latency import measure_group_against
from deploykit.bench.machine import device_info
from deploykit.zoo import get_entry

HERE = Path(__file__).resolve().parent


def _unet(config: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def _inputs(config: dict) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, config["sample_size"], config["sample_size"], generator=g), torch.tensor([500, 500]),
            torch.randn(2, 77, config["cross_attention_dim"], generator=g))


class _Call(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _macs(unet, inputs) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*inputs)
    return counter.get_total_flops() / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    import onnxruntime as ort

    full = dict(get_entry("shapes").unet_config)
    half = {**full, "block_out_channels": [c // 2 for c in full["block_out_channels"]],
            "norm_num_groups": full["norm_num_groups"] // 2}
    calls, macs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("full", full), ("half", half)):
            unet, inputs = _unet(config), _inputs(config)
            macs[name] = _macs(unet, inputs)
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(_Call(unet), inputs, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                              output_names=["out_sample"], opset_version=17, dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"sample": inputs[0].numpy(), "timestep": inputs[1].numpy(), "encoder_hidden_states": inputs[2].numpy()}

            def torch_call(unet=unet, inputs=inputs):
                with torch.no_grad():
                    unet(*inputs)
            calls[f"torch-cpu {name}"] = torch_call
            calls[f"onnxruntime-cpu {name}"] = lambda session=session, feed=feed: session.run(None, feed)
        latency, ratio = measure_group_against(calls, "onnxruntime-cpu full", warmup=10, runs=args.runs)
    load = os.getloadavg()
    result = {
        "command": "python benchmarks/shapes_unet_width.py",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], **device_info(),
                    "load_average_1_5_15": [round(x, 2) for x in load],
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
        "configs": {"full": full, "half": half},
        "gmacs_per_call": {k: round(v / 1e9, 3) for k, v in macs.items()},
        "latency": {k: {"p50_ms": round(v.p50_ms, 2), "p90_ms": round(v.p90_ms, 2), "runs": v.runs} for k, v in latency.items()},
        "speedup_half_vs_full": {
            backend: {"p50": round(latency[f"{backend} full"].p50_ms / latency[f"{backend} half"].p50_ms, 2),
                      "pair_median": round(ratio[f"{backend} half"] / ratio[f"{backend} full"], 2)}
            for backend in ("torch-cpu", "onnxruntime-cpu")},
        "macs_ratio_half": round(macs["half"] / macs["full"], 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shapes_unet_width.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# shapes teacher UNet: full width against half the channels, batch 2",
        "",
        f"`{result['command']}` on {m['cpu']}, {m['threads']} threads, {m['platform']}, torch {m['torch']}, "
        f"onnxruntime {ort.__version__}, OMP_WAIT_POLICY {m['omp_wait_policy']}; load average at the end "
        f"{load[0]:.1f} (other processes shared the cores: round-robin timing, so both widths saw the same contention).",
        "",
        "| width | block_out_channels | GMACs / call | torch-cpu p50 | onnxruntime-cpu p50 |",
        "|---|---|---|---|---|",
    ]
    for name in ("full", "half"):
        lines.append(f"| {name} | {result['configs'][name]['block_out_channels']} | {result['gmacs_per_call'][name]} | "
                     f"{result['latency'][f'torch-cpu {name}']['p50_ms']} ms | "
                     f"{result['latency'][f'onnxruntime-cpu {name}']['p50_ms']} ms |")
    s = result["speedup_half_vs_full"]
    lines += ["", f"MACs ratio {result['macs_ratio_half']}; half-width speedup: torch-cpu {s['torch-cpu']['p50']}x "
                  f"(pair median {s['torch-cpu']['pair_median']}x), onnxruntime-cpu {s['onnxruntime-cpu']['p50']}x "
                  f"(pair median {s['onnxruntime-cpu']['pair_median']}x).", ""]
    (args.out / "shapes_unet_width.md").write_text("\n".join(lines))
    print(json.dumps({k: result[k] for k in ("gmacs_per_call", "latency", "speedup_half_vs_full")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
