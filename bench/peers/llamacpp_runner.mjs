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

/** One stream: evaluate the prompt once `admitted` resolves, call `prefilled` at the first token,
 *  pull the second once `decoding` resolves, and so on up to `tokens` greedy tokens. Stamps each
 *  arrival (performance.now()). */
async function stream(sequence, prompt, tokens, admitted, prefilled, decoding) {
    const trace = {submitted_ms: performance.now(), arrivals_ms: [], tokens: [], eog: 0};
    try {
        if (tokens <= 0) return trace;
        await admitted;
        for await (const token of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
            trace.arrivals_ms.push(performance.now());
            trace.tokens.push(token);
            if (model.isEogToken(token)) trace.eog += 1;
            if (trace.tokens.length >= tokens) break;
            if (trace.tokens.length === 1) {
                prefilled();
                await decoding;  // the generator queues its next decode only when pulled
            }
        }
        return trace;
    } finally {
        prefilled();
    }
}

/** `users` streams at once over one context; the sequences are fresh for every run.
 *
 *  Each prompt is evaluated in a batch of its own (prompt i once user i-1 has its first token),
 *  and decoding starts when every user has its first token; from then on each decode batch holds
 *  the users' next tokens. A batch holding prompts of unequal length, or a prompt beside decode
 *  rows, gave users each other's first tokens in node-llama-cpp 3.21.1; decode batches of four
 *  or more users still sometimes hand a token to the wrong user (seen with 4 and 8 users; the
 *  cost of a step does not depend on which user gets which logits, so the timing stands, and
 *  tests/bench/test_llamacpp_peer.py checks every user's first token and one user's whole answer). */
async function run(context, users, tokens) {
    const sequences = Array.from({length: users}, () => context.getSequence());
    try {
        const t0 = performance.now();
        let admitted = Promise.resolve(), left = users, allPrefilled;
        const decoding = new Promise((resolve) => { allPrefilled = resolve; });
        const streams = sequences.map((s, i) => {
            let prefilled;
            const next = new Promise((resolve) => {
                let once = false;
                prefilled = () => {
                    if (once) return;
                    once = true;
                    resolve();
                    if (--left === 0) allPrefilled();
                };
            });
            const one = stream(s, job.prompts[i % job.prompts.length], tokens, admitted, prefilled, decoding);
            admitted = next;
            return one;
        });
        const done = await Promise.all(streams);
        return {started_ms: t0, ended_ms: performance.now(), streams: done};
    } finally {
        // dispose() hands the sequence id back only after it cleared that sequence's KV cells
        // (async, under the context's lock): not awaited, the next run's getSequence() either
        // finds no id left or gets an id whose cells are cleared while it already evaluates
        await Promise.all(sequences.map((s) => s.dispose()));
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
