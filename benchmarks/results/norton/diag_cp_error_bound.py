import time, torch, tensorslim as ts
from tensorslim.tensor.filter_cp import filter_cp
torch.set_num_threads(1)
m = ts.models.load_pretrained("vgg16").eval()
mods = dict(m.named_modules())
for name in ("features.3", "features.17", "features.30"):
    w = mods[name].weight.detach().double()
    n2 = w.flatten(1).pow(2).sum(1)
    def tot(e): return float(((e**2*n2).sum()/n2.sum())**0.5)
    row = [name]
    for it in (30, 300, 1000):
        t0=time.perf_counter(); cp = filter_cp(w, 2, n_iter=it, tol=0.0); row.append(f"{it}:{tot(cp.errors):.4f}({time.perf_counter()-t0:.1f}s)")
    # best of 5 seeds w/ random init? filter_cp uses HOSVD; emulate random restarts via perturbation not available -> lower bounds
    lbs = []
    for mode in range(3):
        unf = w.movedim(mode+1, 1).reshape(w.shape[0], w.shape[mode+1], -1)
        s = torch.linalg.svdvals(unf)
        lbs.append(s[:, 2:].pow(2).sum(1))
    lb = torch.stack(lbs).max(0).values
    row.append(f"lower bound (best rank-2 of the worst unfolding) {float((lb.sum()/n2.sum())**0.5):.4f}")
    print(*row, flush=True)
