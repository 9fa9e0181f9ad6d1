// Greedy generation in a real llama.cpp (node-llama-cpp's prebuilt CPU build), timed, for bench_eval.py.
// One JSON request on stdin:
//   {"llamacpp": dir holding node_modules/node-llama-cpp, "model": path.gguf, "prompts": [[id...]...],
//    "max_tokens": n, "threads": n, "parallel": n}
// One JSON answer on stdout: {"generated": [[id...]...], "seconds": s, "load_seconds": s}. "generated" holds each
// prompt's new tokens up to and with its end-of-generation token; "seconds" is the wall time of all prompts
// (prompt evaluation and generation), the model already loaded. With "parallel" > 1, that many sequences of one
// context generate at once (llama.cpp evaluates their tokens in one batch), each taking the next prompt when done.
const request = JSON.parse(await new Promise((resolve) => {
    let text = "";
    process.stdin.on("data", (chunk) => (text += chunk));
    process.stdin.on("end", () => resolve(text));
}));
const { getLlama, LlamaLogLevel } = await import(`${request.llamacpp}/node_modules/node-llama-cpp/dist/index.js`);

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
let started = performance.now();
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const parallel = Math.max(1, request.parallel ?? 1);
const context = await model.createContext({
    contextSize: 512 * parallel,
    sequences: parallel,
    threads: { ideal: request.threads ?? 1, min: request.threads ?? 1 },
});
const loadSeconds = (performance.now() - started) / 1000;

async function greedy(sequence, ids) {
    const out = [];
    for await (const token of sequence.evaluate(ids, { temperature: 0, yieldEogToken: true })) {
        out.push(token);
        if (model.isEogToken(token) || out.length >= request.max_tokens) break;
    }
    await sequence.clearHistory();
    return out;
}

const generated = new Array(request.prompts.length);
let next = 0;
async function worker(sequence) {
    while (next < request.prompts.length) {
        const i = next++;
        generated[i] = await greedy(sequence, request.prompts[i]);
    }
}

started = performance.now();
const sequences = Array.from({ length: parallel }, () => context.getSequence());
await Promise.all(sequences.map(worker));
const seconds = (performance.now() - started) / 1000;
await context.dispose();
await model.dispose();
process.stdout.write(JSON.stringify({ generated, seconds, load_seconds: loadSeconds }) + "\n");
