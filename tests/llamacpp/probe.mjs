// Drive a real llama.cpp (node-llama-cpp's prebuilt CPU build) for the tests: one JSON request per
// stdin line, one JSON answer per stdout line. A request:
//   {"model": path, "lora": path|null, "tokenize": [text...], "generate": [{"ids": [...], "max_tokens": n}...],
//    "chat": [{"messages": [...], "add_generation_prompt": bool}...]}
// Text is tokenized with special tokens parsed, as transformers does. The answer: {"tokens": [[id...]...], "generated": [[id...]...], "text": [string...],
//   "chat_template": string|null, "chat": [string...], "warnings": [string...]} or {"error": message}.
// Warnings are what llama.cpp logged at warn level or above while loading and running this request.
// Chat renders with llama.cpp's own Jinja engine (the one llama-server applies to a file's template).
import readline from "node:readline";

const llamaDir = process.env.SMOLORA_LLAMACPP_DIR;
const { getLlama, LlamaLogLevel } = await import(`${llamaDir}/node_modules/node-llama-cpp/dist/index.js`);

let logged = [];
const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: LlamaLogLevel.warn,
    logger: (level, message) => {
        if (level === LlamaLogLevel.warn || level === LlamaLogLevel.error || level === LlamaLogLevel.fatal)
            logged.push(`${level}: ${message.trim()}`);
    },
});

function renderChat(template, request, special) {
    const items = {
        messages: request.messages,
        add_generation_prompt: Boolean(request.add_generation_prompt),
        bos_token: special.bos,
        eos_token: special.eos,
    };
    const renderer = new llama._bindings.AddonJinjaRenderer(template);
    return renderer.render(items);
}

async function greedy(context, ids, maxTokens) {
    const sequence = context.getSequence();
    const out = [];
    try {
        for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
            if (context.model.isEogToken(token)) break;
            out.push(token);
            if (out.length >= maxTokens) break;
        }
    } finally {
        sequence.dispose();
    }
    return out;
}

async function answer(request) {
    logged = [];
    const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
    try {
        const result = {};
        result.tokens = (request.tokenize ?? []).map((text) => Array.from(model.tokenize(text, true)));
        const tokenizer = model.fileInfo.metadata?.tokenizer ?? {};
        result.chat_template = tokenizer.chat_template ?? null;
        const special = {
            bos: model.tokens.bos == null ? "" : model.detokenize([model.tokens.bos], true),
            eos: model.tokens.eos == null ? "" : model.detokenize([model.tokens.eos], true),
        };
        result.chat = (request.chat ?? []).map((c) => renderChat(result.chat_template, c, special));
        result.chat_tokens = result.chat.map((text) => Array.from(model.tokenize(text, true)));
        result.generated = [];
        if ((request.generate ?? []).length) {
            const lora = request.lora ? { adapters: [{ filePath: request.lora, scale: 1 }] } : undefined;
            const context = await model.createContext({
                contextSize: 256,
                sequences: 1,
                threads: 1,
                ...(lora ? { lora } : {}),
            });
            try {
                for (const g of request.generate) result.generated.push(await greedy(context, g.ids, g.max_tokens ?? 16));
            } finally {
                await context.dispose();
            }
        }
        result.text = result.generated.map((ids) => model.detokenize(ids));
        result.warnings = logged;
        return result;
    } finally {
        await model.dispose();
    }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
    if (!line.trim()) continue;
    let reply;
    try {
        reply = await answer(JSON.parse(line));
    } catch (error) {
        reply = { error: String(error?.stack ?? error), warnings: logged };
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
}
