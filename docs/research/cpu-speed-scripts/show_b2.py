import sys, json
for path in sys.argv[1:]:
    for line in open(path):
        if not line[:1].isdigit(): continue
        n, d = line.split(' ', 1); d = json.loads(d)
        k = [k for k in d if k.startswith('ratio_to') and k.endswith('median')][0]
        kr = k.replace('median', 'range')
        print(path, 'rows', n, 'compile_s', {f: round(v, 1) for f, v in d.get('compile_s', {}).items()}, d['tokens_equal_eager'])
        for name in d['ms_median']:
            print(f'   {name:34s} median {d["ms_median"][name]:8.1f} ms  min {d["ms_min"][name]:8.1f}  ratio {d[k][name]:.2f} ({d[kr][name][0]:.2f}-{d[kr][name][1]:.2f})')
