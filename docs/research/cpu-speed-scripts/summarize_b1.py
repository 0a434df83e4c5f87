import json, sys
d = json.load(open(sys.argv[1]))
print("threads", d["threads"])
for key in [k for k in d if k.startswith("rows=")]:
    print(f"\n{key}  (step = 30 layers x 4 products + head)")
    print(f"{'variant':50s} {'step ms':>8s} {'min':>7s} {'vs bf16':>8s} {'range':>12s} {'qkv':>6s} {'o':>6s} {'g/u':>6s} {'down':>6s} {'head ms':>7s}")
    for n, r in sorted(d[key].items(), key=lambda kv: kv[1]["ratio_to_bf16_median"]):
        pl = r["per_layer_us"]
        print(f"{n:50s} {r['step_ms_median']:8.2f} {r['step_ms_min']:7.2f} {r['ratio_to_bf16_median']:8.2f} {r['ratio_to_bf16_range'][0]:5.2f}-{r['ratio_to_bf16_range'][1]:5.2f} {pl['qkv']:6.0f} {pl['o']:6.0f} {pl['gate_up']:6.0f} {pl['down']:6.0f} {r['head_ms']:7.2f}")
print("\naccuracy vs fp32 (16 rows, layer 0 + head): rel_l2 / max_abs")
for n, e in d["accuracy"].items():
    print(f"{n:50s} " + "  ".join(f"{k}:{v['rel_l2']:.1e}/{v['max_abs']:.1e}" for k, v in e.items()))
