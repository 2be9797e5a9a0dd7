import assert from "node:assert/strict";
import { join } from "node:path";
import { isUserError } from "../../util/errors.ts";
import { FALLBACK_CHAT_TEMPLATE, Tokenizer } from "../../models/tokenizer.ts";

const TEACHER = new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname;
const REF = new URL("../../fixtures/reference/llama_stories260k", import.meta.url).pathname;
const TEXT = new URL("../../fixtures/text", import.meta.url).pathname;
const TESTDATA = new URL("./testdata", import.meta.url).pathname;

const tok = await Tokenizer.fromDir(TEACHER);
const meta = JSON.parse(await Deno.readTextFile(join(REF, "meta.json")));

/** Zephyr's chat template (HuggingFaceH4/zephyr-7b-beta tokenizer_config.json). */
const ZEPHYR =
  "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

async function withTokenizerDir(
  files: Record<string, string>,
  fn: (dir: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "distillery-tok-" });
  try {
    await Deno.copyFile(join(TEACHER, "tokenizer.json"), join(dir, "tokenizer.json"));
    await Deno.copyFile(join(TEACHER, "tokenizer_config.json"), join(dir, "tokenizer_config.json"));
    for (const [f, text] of Object.entries(files)) await Deno.writeTextFile(join(dir, f), text);
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("tokenizer: prompt ids equal the reference (post-processor adds BOS = 1)", async () => {
  for (const p of meta.prompts) {
    if (p.prompt === null) continue;
    assert.deepEqual(tok.encode(p.prompt), p.ids, p.key);
    assert.deepEqual(tok.encode(p.prompt, { addSpecialTokens: false }), p.ids.slice(1), p.key);
  }
  // p3: the first 2400 bytes of the training text, truncated to 300 ids including BOS.
  const bytes = (await Deno.readFile(join(TEXT, "tinystories_train.txt"))).subarray(0, 2400);
  const p3 = meta.prompts.find((p: { key: string }) => p.key === "p3");
  assert.deepEqual(tok.encode(new TextDecoder().decode(bytes)).slice(0, 300), p3.ids);
});

Deno.test("tokenizer: ce_token_ids.json equals the first 64 KiB of the validation text without BOS", async () => {
  const bytes = (await Deno.readFile(join(TEXT, "tinystories_valid.txt"))).subarray(0, 65536);
  const expected = JSON.parse(await Deno.readTextFile(join(REF, "ce_token_ids.json"))).ids_without_bos;
  const ids = tok.encode(new TextDecoder().decode(bytes), { addSpecialTokens: false });
  assert.equal(ids.length, 31401);
  assert.deepEqual(ids, expected);
});

Deno.test("tokenizer: decode round-trips, token strings and special ids", () => {
  for (const p of meta.prompts) {
    if (p.prompt === null) continue;
    assert.equal(tok.decode(tok.encode(p.prompt), { skipSpecialTokens: true }), p.prompt);
    assert.equal(tok.decode(tok.encode(p.prompt)), `<s> ${p.prompt}`);
  }
  // Byte fallback: characters outside the 512-token vocabulary survive the round trip.
  const odd = "Zoë said “hi” 🙂.";
  assert.equal(tok.decode(tok.encode(odd, { addSpecialTokens: false })), odd);
  assert.deepEqual(tok.tokens([1, 403, 407]), ["<s>", "▁Once", "▁upon"]);
  assert.equal(tok.idToToken(2), "</s>");
  assert.equal(tok.tokenToId("<unk>"), 0);
  assert.equal(tok.bosTokenId, 1);
  assert.equal(tok.eosTokenId, 2);
  assert.equal(tok.unkTokenId, 0);
  assert.equal(tok.padTokenId, null);
  assert.equal(tok.vocabSize, 512);
  assert.ok(tok.isSpecial(1) && tok.isSpecial(2) && !tok.isSpecial(403));
  // The reference greedy continuation decodes to the story the fixtures README quotes.
  const p0 = meta.prompts[0];
  assert.ok(
    tok.decode(p0.gen_ids).startsWith(
      "She loved to play outside in the park. One day, she saw a big, red ball.",
    ),
  );
});

Deno.test("tokenizer: streaming decode pieces concatenate to the full decode", () => {
  for (
    const ids of [
      meta.prompts[0].gen_ids,
      tok.encode("Zoë said “hi” 🙂. Then\n\nthey  left.", { addSpecialTokens: false }),
    ]
  ) {
    const s = tok.streamDecoder();
    let text = "";
    for (const id of ids) text += s.push(id);
    text += s.flush();
    assert.equal(text, tok.decode(ids, { skipSpecialTokens: true }));
  }
  // A multi-byte character split over byte-fallback tokens is held back until complete.
  const ids = tok.encode("🙂", { addSpecialTokens: false });
  assert.ok(ids.length > 1);
  const s = tok.streamDecoder();
  const pieces = ids.map((id) => s.push(id));
  assert.deepEqual(pieces.slice(0, -1).filter((p) => p !== ""), []);
  assert.equal(pieces.join("") + s.flush(), tok.decode(ids));
});

Deno.test("tokenizer: fallback chat template for a tokenizer without one", () => {
  assert.equal(tok.hasOwnChatTemplate, false);
  assert.equal(tok.chatTemplate, FALLBACK_CHAT_TEMPLATE);
  const messages = [
    { role: "system", content: "Be kind." },
    { role: "user", content: "Tell me a story." },
    { role: "assistant", content: "Once upon a time." },
    { role: "user", content: "More!" },
  ];
  assert.equal(
    tok.applyChatTemplate(messages, { addGenerationPrompt: true }),
    "<s>Be kind.\n\nUser: Tell me a story.\n\nAssistant: Once upon a time.</s>\n\nUser: More!\n\nAssistant:",
  );
  assert.equal(
    tok.applyChatTemplate(messages.slice(1, 3)),
    "<s>User: Tell me a story.\n\nAssistant: Once upon a time.</s>\n\n",
  );
  const ids = tok.encodeChat(messages.slice(1, 3));
  assert.equal(ids[0], 1);
  assert.equal(ids.filter((i) => i === 1).length, 1); // the template's BOS only
  assert.ok(ids.includes(2)); // "</s>" in the text is the EOS token, not its characters
  assert.throws(
    () => tok.applyChatTemplate([{ role: "robot", content: "x" }]),
    (e: Error) => isUserError(e) && e.message.includes("robot"),
  );
  assert.throws(
    () => tok.applyChatTemplate([{ role: "user" } as never]),
    (e: Error) => isUserError(e) && e.message.includes("chat message 0"),
  );
});

Deno.test("tokenizer: fallback and Zephyr templates render and encode exactly as transformers does", async () => {
  const oracle = JSON.parse(await Deno.readTextFile(join(TESTDATA, "transformers_oracle.json")));
  const cfg = JSON.parse(await Deno.readTextFile(join(TEACHER, "tokenizer_config.json")));
  const zephyr = new Tokenizer(
    JSON.parse(await Deno.readTextFile(join(TEACHER, "tokenizer.json"))),
    { ...cfg, chat_template: ZEPHYR },
  );
  for (const [name, t] of [["fallback", tok], ["zephyr", zephyr]] as const) {
    for (const gen of [false, true]) {
      const ref = oracle.chat[`${name}${gen ? "_generation_prompt" : ""}`];
      const text = t.applyChatTemplate(oracle.chat_messages, { addGenerationPrompt: gen });
      assert.equal(text, ref.text, `${name} ${gen}`);
      assert.deepEqual(
        t.encodeChat(oracle.chat_messages, { addGenerationPrompt: gen }),
        ref.ids,
        `${name} ${gen}`,
      );
    }
  }
});

Deno.test("tokenizer: chat templates from tokenizer_config.json, chat_template.jinja and chat_template.json", async () => {
  const messages = [{ role: "system", content: "You are a friendly chatbot." }, {
    role: "user",
    content: "Hello",
  }];
  const cfg = JSON.parse(await Deno.readTextFile(join(TEACHER, "tokenizer_config.json")));
  // Zephyr's template relies on transformers' trim_blocks / lstrip_blocks.
  await withTokenizerDir(
    { "tokenizer_config.json": JSON.stringify({ ...cfg, chat_template: ZEPHYR }) },
    async (dir) => {
      const t = await Tokenizer.fromDir(dir);
      assert.equal(t.hasOwnChatTemplate, true);
      assert.equal(
        t.applyChatTemplate(messages, { addGenerationPrompt: true }),
        "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHello</s>\n<|assistant|>\n",
      );
    },
  );
  const llama = await Deno.readTextFile(join(TESTDATA, "llama3.2_chat_template.jinja"));
  await withTokenizerDir({ "chat_template.jinja": llama }, async (dir) => {
    const t = await Tokenizer.fromDir(dir);
    assert.equal(
      t.applyChatTemplate(
        [{ role: "system", content: "You are helpful." }, { role: "user", content: "Hi!" }],
        {
          addGenerationPrompt: true,
          extra: { date_string: "26 Jul 2024" },
        },
      ),
      "<s><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" +
        "You are helpful.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    );
  });
  await withTokenizerDir({
    "chat_template.json": JSON.stringify({ chat_template: "{{ messages[0]['content'] }}!" }),
  }, async (dir) => {
    assert.equal((await Tokenizer.fromDir(dir)).applyChatTemplate(messages.slice(1)), "Hello!");
  });
  // A list of named templates: the "default" one is used.
  const named = [{ name: "tool_use", template: "T" }, {
    name: "default",
    template: "D{{ add_generation_prompt }}",
  }];
  await withTokenizerDir(
    { "tokenizer_config.json": JSON.stringify({ ...cfg, chat_template: named }) },
    async (dir) => {
      assert.equal(
        (await Tokenizer.fromDir(dir)).applyChatTemplate([], { addGenerationPrompt: true }),
        "Dtrue",
      );
    },
  );
});

Deno.test("tokenizer: missing or broken files are UserErrors with the fix", async () => {
  const dir = await Deno.makeTempDir({ prefix: "distillery-tok-" });
  try {
    await Deno.copyFile(join(TEACHER, "tokenizer.model"), join(dir, "tokenizer.model"));
    await assert.rejects(Tokenizer.fromDir(dir), (e: Error) => {
      return isUserError(e) && e.message.includes("no tokenizer.json") &&
        e.message.includes("save_pretrained");
    });
    await Deno.writeTextFile(join(dir, "tokenizer.json"), "{oops");
    await assert.rejects(
      Tokenizer.fromDir(dir),
      (e: Error) => isUserError(e) && e.message.includes("tokenizer.json: not valid JSON"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  await withTokenizerDir({ "chat_template.jinja": "{% for x in %}" }, async (d) => {
    await assert.rejects(
      Tokenizer.fromDir(d),
      (e: Error) => isUserError(e) && e.message.includes("chat template does not parse"),
    );
  });
});

Deno.test("tokenizer: satisfies the data layer's TextTokenizer interface", async () => {
  const { Tokenizer } = await import("../../models/tokenizer.ts");
  const tok = await Tokenizer.fromDir(
    new URL("../../fixtures/models/stories260K-hf", import.meta.url).pathname,
  );
  const asText: import("../../data/tokenizer.ts").TextTokenizer = tok;
  if (asText.bosId !== 1 || asText.eosId !== 2) throw new Error(`bos/eos ${asText.bosId}/${asText.eosId}`);
});
