"""The output head in bf16 and in per-channel int8 (`_weight_int8pack_mm`) against fp32, teacher-
forced over four texts (greedy flips, largest log-prob error), and their time at 1 row.
docs/research/cpu-speed.md §5.
"""
import pathlib
import torch, time, glob
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
d = glob.glob(str(pathlib.Path(__file__).resolve().parents[4] / "models" / "*SmolLM2*"))[0]
tok = AutoTokenizer.from_pretrained(d); m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
texts = ["A contract is a legally binding agreement between two parties. It requires an offer, acceptance and consideration.",
 "Fever is a temporary increase in body temperature, often due to an illness. Drink fluids and rest.",
 "To save money each month, start with a budget, track your spending, and build an emergency fund.",
 "The history of the Roman Empire spans centuries, from the founding of Rome to the fall of Constantinople."]
W = m.lm_head.weight.detach()
wb = W.to(torch.bfloat16)
sc = W.abs().amax(1) / 127
w8 = torch.round(W / sc[:, None]).clamp(-127, 127).to(torch.int8)
flips = {"bf16": 0, "int8": 0}; n = 0; lperr = {"bf16": [], "int8": []}
with torch.no_grad():
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        h = m.model(ids).last_hidden_state[0]
        ref = h @ W.t()
        outs = {"bf16": (h.to(torch.bfloat16) @ wb.t()).float(),
                "int8": torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), w8, sc.to(torch.bfloat16)).float()}
        tgt = ids[0, 1:]
        lref = ref.log_softmax(-1)
        for k, o in outs.items():
            flips[k] += int((o.argmax(-1) != ref.argmax(-1)).sum())
            lo = o.log_softmax(-1)
            lperr[k].append((lo[:-1].gather(1, tgt[:, None]) - lref[:-1].gather(1, tgt[:, None])).abs().max().item())
        n += ids.shape[1]
print("positions", n, "greedy flips", flips, "max logprob err", {k: max(v) for k, v in lperr.items()})
hb = torch.randn(1, 576).to(torch.bfloat16); sc16 = sc.to(torch.bfloat16)
def bench(f, n=50):
    for _ in range(5): f()
    ts = []
    for _ in range(5):
        a = time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter() - a) / n)
    return min(ts) * 1e3
for th in (1, 2):
    torch.set_num_threads(th)
    print(th, "threads: bf16 mv %.2f ms, int8pack %.2f ms" % (bench(lambda: torch.mv(wb, hb[0])), bench(lambda: torch.ops.aten._weight_int8pack_mm(hb, w8, sc16))))
