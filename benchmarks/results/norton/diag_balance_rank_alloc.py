import time, sys, copy, torch, tensorslim as ts
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.methods.norton import norton
from tensorslim.recover import RecoverConfig, recover
from tensorslim.train import evaluate
from tensorslim.planning import make_plan
from tensorslim.surgery import compress
from tensorslim.layers import FilterCPConv2d
from tensorslim.tensor.filter_cp import filter_cp
torch.set_num_threads(1)
loaders = make_loaders(64, seed=0, augment=False, subset=20000)
test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(2000)), 500)
model = ts.models.load_pretrained("vgg16").eval()
x = torch.randn(1,1,28,28)
def balance(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, FilterCPConv2d):
                a = mod.project_in.weight; b = mod.depth_h.weight; c = mod.depth_w.weight
                na, nb, nc = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1), c.flatten(1).norm(dim=1)
                g = (na*nb*nc).clamp_min(1e-30) ** (1/3)
                a.mul_((g/na.clamp_min(1e-30)).view(-1,1,1,1)); b.mul_((g/nb.clamp_min(1e-30)).view(-1,1,1,1)); c.mul_((g/nc.clamp_min(1e-30)).view(-1,1,1,1))
    return m
def ft(m, tag):
    t0 = time.perf_counter()
    cfg = RecoverConfig(bn_steps=0, finetune_steps=300, lr=0.01, distill=True)
    tuned = recover(copy.deepcopy(m), model, cfg, train_loader=loaders.train, progress=False).model
    print(tag, "before", evaluate(m, test)["accuracy"], "after 300", evaluate(tuned, test)["accuracy"], f"{time.perf_counter()-t0:.0f}s", flush=True)
which = sys.argv[1:]
if "B" in which:
    res = norton(model, x, rank=2, target_macs=0.23, n_iter=30, train_loader=loaders.train, progress=False)
    ft(balance(res.model), "B balanced uniform-prune 0.23")
if "C" in which:
    mods = dict(model.named_modules()); rep = ts.count(model, x); tot = rep.total_macs
    info = {}
    for lc in rep.layers:
        mod = mods[lc.name]
        if type(mod) is torch.nn.Conv2d and mod.kernel_size[0] > 1 and mod.in_channels > 1:
            w = mod.weight.detach().double()
            errs = {r: float((filter_cp(w, r, n_iter=30).errors**2 * w.flatten(1).pow(2).sum(1)).sum() / w.pow(2).sum()) for r in range(1, 5)}
            macs = {r: FilterCPConv2d.cost(mod, r, lc.in_shape[1:], lc.out_shape[1:])[1] for r in range(1, 5)}
            info[lc.name] = (errs, macs, lc.macs)
    ranks = {n: 4 for n in info}
    def total():
        return tot - sum(v[2] for v in info.values()) + sum(info[n][1][ranks[n]] for n in info)
    while total() > 0.23 * tot:
        best = min((n for n in info if ranks[n] > 1), key=lambda n: (info[n][0][ranks[n]-1]-info[n][0][ranks[n]]) / (info[n][1][ranks[n]]-info[n][1][ranks[n]-1]))
        ranks[best] -= 1
    print("ranks", ranks, total()/tot)
    plan = make_plan(model, "filtercp", x, ranks=ranks)
    m = compress(copy.deepcopy(model), plan)
    m = recover(m, model, RecoverConfig(bn_steps=50), train_loader=loaders.train, progress=False).model
    print("macs", ts.count(m, x).total_macs / tot)
    ft(m, "C greedy ranks no prune")
    if "D" in which:
        ft(balance(m), "D greedy ranks balanced")
