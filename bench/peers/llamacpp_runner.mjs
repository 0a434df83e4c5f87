// One measurement run of llama.cpp (node-llama-cpp) for `python -m bench.serving --peer llamacpp`.
//
//   node bench/peers/llamacpp_runner.mjs < job.json > result.json
//
// The job (JSON on stdin) names the GGUF, the thread count, the new tokens per stream, the prompts
// as token ids (the engine's own, so both sides read the same tokens) and the rows to measure:
// {key, users, repeat}. Each row gets its own context with `sequences: users` (as one would size
// llama.cpp for that many concurrent users); user i reads prompts[i % prompts.length]. Every
// stream is greedy and goes on past end-of-generation tokens (EOS ignored) until `tokens` came.
// Nothing is computed here: the result holds when each stream was submitted and when each of its
// tokens arrived (performance.now(), ms), and the Python side does the arithmetic the engine's rows
// get. Progress and errors go to stderr; stdout holds only the result.
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const job = JSON.parse(readFileSync(0, "utf8"));
for (const field of ["gguf", "threads", "tokens", "prompts", "rows"])
    if (job[field] == null) throw new Error(`job: missing "${field}"`);

const started = performance.now();
const llama = await getLlama({
    gpu: false,                 // the peer is llama.cpp on the CPU, like the engine's CPU rows
    build: "never",             // the prebuilt binaries or nothing: no compiler run inside a benchmark
    maxThreads: job.threads,    // its default is max(cores, 4): more threads than cores here
    logLevel: LlamaLogLevel.error,
    progressLogs: false,
});
const model = await llama.loadModel({modelPath: job.gguf});
const loadMs = performance.now() - started;

const longestPrompt = Math.max(...job.prompts.map((p) => p.length));
const perSequence = longestPrompt + job.tokens + 16;

/** One stream: evaluate the prompt, then take `tokens` greedy tokens; stamps each arrival. */
async function stream(sequence, prompt, tokens) {
    const trace = {submitted_ms: performance.now(), arrivals_ms: [], tokens: [], eog: 0};
    if (tokens <= 0) return trace;
    for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
        trace.arrivals_ms.push(performance.now());
        trace.tokens.push(token);
        if (model.isEogToken(token)) trace.eog += 1;
        if (trace.tokens.length >= tokens) break;
    }
    return trace;
}

/** `users` streams at once over one context; the sequences are fresh for every run. */
async function run(context, users, tokens) {
    const sequences = Array.from({length: users}, () => context.getSequence());
    try {
        const t0 = performance.now();
        const streams = await Promise.all(sequences.map((s, i) => stream(s, job.prompts[i % job.prompts.length], tokens)));
        return {started_ms: t0, ended_ms: performance.now(), streams};
    } finally {
        for (const s of sequences) s.dispose();
    }
}

const rows = [];
let threads = null;
for (const row of job.rows) {
    const context = await model.createContext({
        sequences: row.users, contextSize: perSequence, threads: {ideal: job.threads, min: job.threads},
    });
    threads = context.currentThreads;
    try {
        await run(context, 1, job.warmup_tokens ?? 2);  // first decode allocates the compute buffers
        const runs = [];
        for (let r = 0; r < (row.repeat ?? 1); r++) runs.push(await run(context, row.users, job.tokens));
        rows.push({key: row.key, users: row.users, runs});
        process.stderr.write(`llamacpp: ${row.key} done\n`);
    } finally {
        await context.dispose();
    }
}

// the package exports no package.json; it sits beside this script under node_modules
const version = JSON.parse(readFileSync(new URL("./node_modules/node-llama-cpp/package.json", import.meta.url), "utf8")).version;
process.stdout.write(JSON.stringify({
    node: process.version,
    node_llama_cpp: version,
    llama_cpp: llama.llamaCppRelease.release,
    build: llama.buildType,
    gpu: llama.gpu,
    threads,
    system_info: llama.systemInfo,
    model_bytes: model.size,
    load_ms: loadMs,
    rows,
}) + "\n");
await model.dispose();
await llama.dispose();
