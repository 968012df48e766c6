import time, torch, tensorslim as ts
from tensorslim.tensor.filter_cp import filter_cp
torch.set_num_threads(1)
m = ts.models.load_pretrained("vgg16").eval()
print(ts.models.pretrained_info("vgg16"))
x = torch.randn(1,1,28,28)
rep = ts.count(m, x)
tot = rep.total_macs
for lc in rep.layers:
    mod = dict(m.named_modules())[lc.name]
    if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size[0] > 1 and mod.in_channels > 1:
        w = mod.weight.detach().double()
        row = [lc.name, tuple(w.shape[:2]), lc.in_shape[2:], f"{lc.macs/tot:.3f}"]
        for it in (30, 300):
            t0 = time.perf_counter(); cp = filter_cp(w, 2, n_iter=it, tol=0.0)
            row += [f"{it}:{float(cp.errors.mean()):.4f}/{float((cp.errors**2*w.flatten(1).pow(2).sum(1)).sum()/w.pow(2).sum()).__pow__(0.5):.4f}({time.perf_counter()-t0:.1f}s)"]
        print(*row, flush=True)
