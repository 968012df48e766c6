"""NORTON R=2 at 0.23 of the MACs on the shipped VGG-16, accuracy BEFORE fine-tuning on the
full test set: CP-ALS sweeps 30 vs 300, with / without the channel-factor refit (4 batches
of 64), with / without BatchNorm re-calibration (50 batches) after it.
OMP_NUM_THREADS=1 nice -n 10 python benchmarks/results/norton/before_ft.py"""
import copy
import time

import torch

import tensorslim as ts
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.methods.norton import norton
from tensorslim.recover import RecoverConfig, recover
from tensorslim.train import evaluate

torch.set_num_threads(1)
loaders = make_loaders(64, seed=0, augment=False, subset=20000)
test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(10000)), 500)
model = ts.models.load_pretrained("vgg16").eval()
x = torch.randn(1, 1, 28, 28)
print("| n_iter | refit batches | BN re-calibration | accuracy before FT | time (s) |")
print("|---|---|---|---|---|")
for n_iter, refit, bn in ((30, 0, 50), (300, 0, 50), (300, 4, 0), (300, 4, 50)):
    t0 = time.perf_counter()
    res = norton(model, x, rank=2, target_macs=0.23, n_iter=n_iter, refit_steps=refit,
                 bn_steps=bn, train_loader=loaders.train, progress=False)
    print(f"| {n_iter} | {refit} | {bn} | {evaluate(res.model, test)['accuracy']:.4f} | "
          f"{time.perf_counter() - t0:.0f} |", flush=True)
    if refit:
        print("refit errors (before -> after):",
              {f["layer"]: (f["error_before"], f["error_after"]) for f in res.history["refit"]})
