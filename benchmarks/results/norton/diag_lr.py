import time, sys, copy, torch, tensorslim as ts
sys.path.insert(0, "/tmp")
from tensorslim.data import TensorBatchLoader, make_loaders
from tensorslim.methods.norton import norton
from tensorslim.recover import RecoverConfig, recover
from tensorslim.train import evaluate
torch.set_num_threads(1)
loaders = make_loaders(64, seed=0, augment=False, subset=20000)
test = TensorBatchLoader(loaders.test.dataset.subset(torch.arange(2000)), 500)
model = ts.models.load_pretrained("vgg16").eval()
x = torch.randn(1,1,28,28)
res = norton(model, x, rank=2, target_macs=0.23, n_iter=30, train_loader=loaders.train, progress=False)
for lr in map(float, sys.argv[1:]):
    t0 = time.perf_counter()
    cfg = RecoverConfig(bn_steps=0, finetune_steps=300, lr=lr, distill=True)
    tuned = recover(copy.deepcopy(res.model), model, cfg, train_loader=loaders.train, progress=False).model
    print("lr", lr, "after 300", evaluate(tuned, test)["accuracy"], f"{time.perf_counter()-t0:.0f}s", flush=True)
