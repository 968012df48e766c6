"""LTC under ``torchrun --nproc_per_node 2`` (gloo, CPU): both ranks end with the same
weights, ranks and plan, the run equals the one-process run on the same global batches, and
no DDP wrapper or process group outlives it."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from _ports import torchrun  # tests/_ports.py (tests/ is on the path through its conftest)
from safetensors.torch import load_file

import tensorslim as ts
from tensorslim.methods.ltc import ltc

# the model, data and settings: shared by the torchrun job (a copy of this text) and the
# one-process reference below
COMMON = textwrap.dedent("""
    import torch
    from torch import nn
    from tensorslim.data import TensorBatchLoader
    from tensorslim.data.loaders import FashionMNIST

    def toy():
        # no BatchNorm: a 2-rank step on 2 x 8 samples is then the 1-process step on 16
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                            nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(16, 10))
        with torch.no_grad():  # decaying channel spectra, as trained kernels have
            for m in net:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    w = m.weight.view(m.weight.shape[0], m.weight.shape[1], -1)
                    w.mul_(4 * (0.8 ** torch.arange(w.shape[0]))[:, None, None]
                           * (0.8 ** torch.arange(w.shape[1]))[None, :, None])
        return net

    def loader(batch):
        g = torch.Generator().manual_seed(1)
        ds = FashionMNIST(images=torch.randint(0, 256, (64, 8, 8), dtype=torch.uint8, generator=g),
                          labels=torch.randint(0, 10, (64,), generator=g))
        return TensorBatchLoader(ds, batch, shuffle=True, seed=0)

    X = torch.zeros(1, 1, 8, 8)
    SETTINGS = dict(target_macs=0.4, lc_steps=3, steps_per_lc_step=3, mu0=0.05, mu_growth=2.5,
                    lr=0.05, finetune_steps=2, bn_steps=0, progress=False)
""")

JOB = COMMON + textwrap.dedent("""
    import gc, hashlib, json, os, sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from tensorslim.methods.ltc import ltc

    torch.set_num_threads(1)
    gc.disable()  # only ltc's own collections may free the W-steps' DDP wrappers
    out, rank = sys.argv[1], int(os.environ["RANK"])
    res = ltc(toy(), X, train_loader=loader(8), state_dir=os.path.join(out, "state"), **SETTINGS)
    sd = {k: v.contiguous() for k, v in res.model.state_dict().items()}
    h = hashlib.sha256()
    for k, v in sorted(sd.items()):
        h.update(k.encode()); h.update(v.numpy().tobytes())
    if rank == 0:
        save_file(sd, os.path.join(out, "model.safetensors"))
    result = {"digest": h.hexdigest(), "plan": json.loads(res.plan.to_json()),
              "history": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in res.history],
              "world_size": res.recovery["finetune"]["world_size"],
              "group_alive": dist.is_initialized(),
              "ddp_alive": sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                               for o in gc.get_objects())}
    open(os.path.join(out, f"rank{rank}.json"), "w").write(json.dumps(result))
""")


@pytest.mark.slow
def test_ltc_under_torchrun_two_ranks_agree_and_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ltc_job.py"
    script.write_text(JOB)
    cmd, env = torchrun(script, tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # meanwhile: the same run in one process on the union of the ranks' batches (16 = 2 x 8)
        ns: dict = {}
        exec(COMMON, ns)
        torch.set_num_threads(1)
        ref = ltc(ns["toy"](), ns["X"], train_loader=ns["loader"](16), **ns["SETTINGS"])
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["digest"] == r1["digest"]  # identical compressed weights on both ranks
    assert r0["plan"] == r1["plan"] and r0["history"] == r1["history"]  # ranks, lam, all-reduced loss
    assert r0["ddp_alive"] == r1["ddp_alive"] == 0 and not r0["group_alive"] and not r1["group_alive"]
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["step"] == 3 and [h["ranks"] for h in state["history"][1:]] == \
        [h["ranks"] for h in r0["history"]]  # written by rank 0, the ranks the run ended with

    assert [h["ranks"] for h in ref.history] == [h["ranks"] for h in r0["history"]]
    assert [h["loss"] for h in ref.history] == pytest.approx([h["loss"] for h in r0["history"]], rel=1e-5)
    keys = ("name", "method", "rank", "params_after", "macs_after")
    assert [{k: s[k] for k in keys} for s in json.loads(ref.plan.to_json())["layers"]] == \
        [{k: s[k] for k in keys} for s in r0["plan"]["layers"]]
    got, want = load_file(str(tmp_path / "model.safetensors")), ref.model.state_dict()
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    # the ranks meet the target, and the plan's MACs are the compressed model's
    plan = ts.CompressionPlan.from_dict(r0["plan"])
    assert 0.98 * 0.4 <= plan.macs_ratio <= 0.4
    assert plan.macs_after == ts.count(ref.model, ns["X"]).total_macs
    assert plan.compressed and all(h["cost_ratio"] <= 0.4 for h in r0["history"])
