# timeout 300 mpirun -n 2 python -m mpi4py examples/pipeline_own_model.py
# (-m mpi4py: an uncaught exception on one rank aborts the job instead of leaving the other waiting)
"""Pipeline your own PyTorch model over 2 MPI ranks with mpimp.

The model is an ordinary nn.Sequential: mpimp cuts it into 2 stages (layers 0-2 on rank
0, 3-5 on rank 1), splits each batch of 32 into 8 micro-batches of 4, and runs the 1F1B
schedule.  Any torch optimizer works on `pipe.parameters()` (this rank's layers only).
"""

import torch
from torch import nn

import mpimp

torch.manual_seed(0)
model = nn.Sequential(  # a small classifier on 20 features, 3 classes
    nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64),
    nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 3),
)

topo = mpimp.init(pp=2)  # 2 pipeline stages (launch with 2 ranks, or 2 x dp)
pipe = mpimp.Pipeline(model, topo, chunks=8, loss_fn=nn.CrossEntropyLoss(), schedule="1f1b",
                      balance=[3, 3])
opt = torch.optim.AdamW(pipe.parameters(), lr=3e-3)
print(f"rank {topo.rank}: stage {topo.pp_rank} owns layers {pipe.layer_indices}", flush=True)

# toy task: the class is the index of the largest of the first three features
g = torch.Generator().manual_seed(topo.dp_rank)
for step in range(200):
    x = torch.randn(32, 20, generator=g)
    y = x[:, :3].argmax(dim=1)
    opt.zero_grad()
    # inputs are needed on the rank holding the first stage, targets on the one holding the
    # last (pipe.is_first_stage / is_last_stage: the schedule places them); others may pass None
    loss = pipe.train_step(x if pipe.is_first_stage else None, y if pipe.is_last_stage else None)
    opt.step()
    if step % 50 == 0 and topo.rank == 0:
        print(f"step {step:3d}  loss {loss:.3f}", flush=True)

x = torch.randn(256, 20, generator=g)
logits = pipe.forward(x if pipe.is_first_stage else None)  # inference: output on the last stage
if logits is not None:
    acc = (logits.argmax(dim=1) == x[:, :3].argmax(dim=1)).float().mean()
    print(f"rank {topo.rank}: accuracy {acc:.1%} after 200 steps (chance 33%)", flush=True)
pipe.close()
topo.free()
