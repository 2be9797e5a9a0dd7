import assert from "node:assert/strict";
import { loadExamples, type PreferenceExample, type PromptCompletionExample } from "../../data/formats.ts";
import { readRecords } from "../../data/records.ts";
import {
  newTokenizeStats,
  pairToSequences,
  tokenizeChat,
  tokenizeConversation,
  tokenizePreference,
  tokenizePromptCompletion,
  tokenizeText,
  truncateSequence,
} from "../../data/tokenize.ts";
import type { ChatMessage, ChatTemplateOptions, TextTokenizer } from "../../data/tokenizer.ts";
import {
  assertUserError,
  fixture,
  FixtureTokenizer,
  fixtureTokenizer,
  jinjaTemplate,
  ZEPHYR_TEMPLATE,
} from "./helpers.ts";

const src = { file: "mem", index: 0 };
const masked = (ids: number[], mask: number[]) => ids.filter((_, i) => mask[i] === 1);

Deno.test("tokenize: plain text is BOS + text + EOS, matching the post-processor's BOS", () => {
  const tok = fixtureTokenizer();
  const text = "Once upon a time, there was a little girl named Lily.";
  const stats = newTokenizeStats();
  const seq = tokenizeText(tok, { kind: "text", text, source: src }, {}, stats);
  assert.deepEqual(seq.ids, [...tok.encode(text), 2]);
  assert.equal(seq.ids[0], 1);
  assert.deepEqual(seq.mask, seq.ids.map((_, i) => (i === 0 ? 0 : 1)));
  assert.deepEqual(stats, {
    examples: 1,
    tokens: seq.ids.length,
    targetTokens: seq.ids.length - 1,
    boundaryMerges: 0,
    truncated: 0,
  });
  const bare = tokenizeText(tok, { kind: "text", text, source: src }, { addBos: false, addEos: false });
  assert.deepEqual(bare.ids, tok.encode(text, { addSpecialTokens: false }));
});

Deno.test("tokenize: chat masks exactly the assistant turns (with the template's end-of-turn)", () => {
  const tok = fixtureTokenizer();
  const messages: ChatMessage[] = [
    { role: "system", content: "Be kind." },
    { role: "user", content: "Tell me a story." },
    { role: "assistant", content: "Once upon a time there was a cat." },
    { role: "user", content: "And then?" },
    { role: "assistant", content: "The cat slept." },
  ];
  const seq = tokenizeChat(tok, { kind: "chat", messages, source: src });
  const full = tok.applyChatTemplate(messages, { addGenerationPrompt: false });
  assert.deepEqual(
    seq.ids,
    tok.encode(full, { addSpecialTokens: false }),
    "ids are those of the full rendering",
  );
  assert.equal(seq.ids.filter((x) => x === 1).length, 1, "BOS from the template, not doubled");
  const targets = tok.decode(masked(seq.ids, seq.mask));
  // (With this legacy SentencePiece tokenizer a "▁" follows every special token, hence "</s> \n".)
  assert.equal(targets, "Once upon a time there was a cat.</s> \nThe cat slept.</s> \n");
  // Two separate runs of targets, one per assistant turn.
  const runs = seq.mask.filter((m, i) => m === 1 && seq.mask[i - 1] !== 1).length;
  assert.equal(runs, 2);
  const all = tokenizeChat(tok, { kind: "chat", messages, source: src }, { completionOnly: false });
  assert.equal(all.mask.reduce((a, b) => a + b, 0), all.ids.length - 1);
});

Deno.test("tokenize: alpaca prompt/completion through the template; targets decode to the output", async () => {
  const tok = fixtureTokenizer();
  const recs = await readRecords({ path: fixture("chat/alpaca_en_demo.json"), limit: 20 });
  const { examples } = await loadExamples(recs, { format: "prompt_completion" });
  const stats = newTokenizeStats();
  for (const ex of examples as PromptCompletionExample[]) {
    const seq = tokenizePromptCompletion(tok, ex, {}, stats);
    assert.equal(seq.ids.length, seq.mask.length);
    assert.equal(tok.decode(masked(seq.ids, seq.mask)), `${ex.completion}</s> \n`);
    assert.equal(
      seq.mask.indexOf(1),
      seq.ids.length - masked(seq.ids, seq.mask).length,
      "one target run at the end",
    );
  }
  assert.equal(stats.examples, 20);
  assert.equal(stats.boundaryMerges, 0);
});

Deno.test("tokenize: a prompt boundary inside a SentencePiece token is detected and made a target", () => {
  const tok = fixtureTokenizer();
  const stats = newTokenizeStats();
  const ex = (prompt: string, completion: string): PromptCompletionExample => ({
    kind: "prompt_completion",
    prompt,
    completion,
    source: src,
  });
  // "time, " + "Tom": the prefix ends in a lone "▁", the full text has "▁T" + "om".
  const merged = tokenizePromptCompletion(
    tok,
    ex("Once upon a time, ", "Tom ran."),
    { template: "none" },
    stats,
  );
  assert.deepEqual(merged.ids, [...tok.encode("Once upon a time, Tom ran."), 2]);
  assert.equal(stats.boundaryMerges, 1);
  const first = merged.mask.indexOf(1);
  assert.equal(tok.decode([merged.ids[first]]).trim(), "T");
  assert.deepEqual(merged.ids.slice(0, first), tok.encode("Once upon a time,"));
  // "time," + " Tom": a clean boundary, exactly the prompt's ids are masked out.
  const clean = tokenizePromptCompletion(
    tok,
    ex("Once upon a time,", " Tom ran."),
    { template: "none" },
    stats,
  );
  assert.equal(stats.boundaryMerges, 1);
  assert.equal(clean.mask.indexOf(1), tok.encode("Once upon a time,").length);
});

/** A toy tokenizer: one token per character, except that "ab" is one token (to force straddling tokens). */
class MergeTokenizer implements TextTokenizer {
  bosId = 0;
  eosId = 1;
  encode(text: string): number[] {
    const out: number[] = [];
    for (let i = 0; i < text.length; i++) {
      if (text[i] === "a" && text[i + 1] === "b") {
        out.push(2);
        i++;
      } else out.push(text.charCodeAt(i));
    }
    return out;
  }
  decode(ids: number[]): string {
    return ids.map((x) => (x === 2 ? "ab" : x < 3 ? "" : String.fromCharCode(x))).join("");
  }
  applyChatTemplate(messages: ChatMessage[], _opts: ChatTemplateOptions): string {
    return messages.map((m) => (m.role === "user" ? `b${m.content}a` : m.content)).join("");
  }
}

Deno.test("tokenize: straddling tokens at both ends of an assistant turn are targets", () => {
  const tok = new MergeTokenizer();
  const stats = newTokenizeStats();
  // Rendering "bxa" + "bya" + "bza" -> tokens b x [ab] y [ab] z a; the assistant's characters are "bya".
  const messages = [{ role: "user", content: "x" }, { role: "assistant", content: "bya" }, {
    role: "user",
    content: "z",
  }];
  const seq = tokenizeConversation(tok, messages, src, { ensureBos: false }, stats);
  const c = (ch: string) => ch.charCodeAt(0);
  assert.deepEqual(seq.ids, [c("b"), c("x"), 2, c("y"), 2, c("z"), c("a")]);
  assert.deepEqual(seq.mask, [0, 0, 1, 1, 1, 0, 0]);
  assert.equal(stats.boundaryMerges, 2);
});

Deno.test("tokenize: a template that is not prefix-stable is reported with the record", async () => {
  const tok = new FixtureTokenizer();
  tok.template = (msgs) =>
    msgs.map((m, i) => `${i === msgs.length - 1 ? "[last]" : ""}${m.content}\n`).join("");
  const messages = [{ role: "user", content: "q" }, { role: "assistant", content: "a" }, {
    role: "user",
    content: "q2",
  }, { role: "assistant", content: "a2" }];
  await assertUserError(
    () => tokenizeChat(tok, { kind: "chat", messages, source: { file: "c.jsonl", index: 4, line: 5 } }),
    "c.jsonl:5 (record 4)",
    "not prefix-stable",
  );
});

Deno.test("tokenize: preference pairs from dpo_en_demo share the prompt; prompt+chosen is the full tokenisation", async () => {
  const tok = fixtureTokenizer();
  const recs = await readRecords({ path: fixture("preference/dpo_en_demo.json"), limit: 12 });
  const { examples } = await loadExamples(recs, { format: "preference" });
  for (const ex of examples as PreferenceExample[]) {
    const pair = tokenizePreference(tok, ex);
    const prompt = ex.prompt as ChatMessage[];
    const full = tok.applyChatTemplate([...prompt, ...(ex.chosen as ChatMessage[])], {
      addGenerationPrompt: false,
    });
    assert.deepEqual([...pair.prompt, ...pair.chosen], tok.encode(full, { addSpecialTokens: false }));
    assert.equal(pair.prompt[0], 1);
    assert.ok(pair.chosen.includes(2) && pair.rejected.includes(2), "completions end their turn with EOS");
    assert.equal(pair.chosen.filter((x) => x === 2).length, 1, "EOS not doubled");
    assert.equal(pair.truncated, false);
    const [c, r] = pairToSequences(pair);
    assert.deepEqual(masked(c.ids, c.mask), pair.chosen);
    assert.deepEqual(masked(r.ids, r.mask), pair.rejected);
  }
});

Deno.test("tokenize: preference truncation follows TRL (prompt from the left, keeping BOS; then completions)", async () => {
  const tok = fixtureTokenizer();
  const words = (n: number, w: string) => Array.from({ length: n }, () => w).join(" ");
  const ex: PreferenceExample = {
    kind: "preference",
    prompt: words(60, "dog"),
    chosen: " " + words(50, "cat"),
    rejected: " " + words(10, "sun"),
    source: src,
  };
  const untruncated = tokenizePreference(tok, ex, { template: "none" });
  assert.ok(untruncated.prompt.length > 32 && untruncated.chosen.length > 32);
  const stats = newTokenizeStats();
  const keepEnd = tokenizePreference(
    tok,
    ex,
    { template: "none", maxLength: 64, maxPromptLength: 32 },
    stats,
  );
  assert.equal(keepEnd.prompt.length, 32);
  assert.deepEqual(keepEnd.prompt, [1, ...untruncated.prompt.slice(-31)]);
  assert.deepEqual(keepEnd.chosen, untruncated.chosen.slice(0, 32));
  assert.deepEqual(keepEnd.rejected, untruncated.rejected, "the short completion already fits");
  assert.ok(keepEnd.truncated);
  assert.equal(stats.truncated, 1);
  const keepStart = tokenizePreference(tok, ex, {
    template: "none",
    maxLength: 64,
    maxPromptLength: 32,
    truncationMode: "keep_start",
  });
  assert.deepEqual(keepStart.prompt, untruncated.prompt.slice(0, 32));
  const roomy = tokenizePreference(tok, ex, { template: "none", maxLength: 4096, maxPromptLength: 512 });
  assert.deepEqual(roomy, untruncated);
  await assertUserError(() => tokenizePreference(tok, ex, { maxLength: 64 }), "max_prompt_length");
});

Deno.test("tokenize: truncateSequence keeps the start", () => {
  const seq = { ids: [1, 5, 6, 7, 2], mask: [0, 1, 1, 1, 1], source: src };
  const stats = newTokenizeStats();
  assert.deepEqual(truncateSequence(seq, 3, stats), { ids: [1, 5, 6], mask: [0, 1, 1], source: src });
  assert.equal(truncateSequence(seq, 5, stats), seq);
  assert.equal(stats.truncated, 1);
});

Deno.test("tokenize: a chat template that raises is reported with the record", async () => {
  const tok = new FixtureTokenizer();
  tok.template = () => {
    throw new Error("Conversation roles must alternate user/assistant/user/assistant/...");
  };
  await assertUserError(
    () => tokenizeChat(tok, { kind: "chat", messages: [{ role: "assistant", content: "a" }], source: src }),
    "mem (record 0)",
    "the chat template failed: Conversation roles must alternate",
  );
});

Deno.test("tokenize: Zephyr's Jinja chat template is prefix-stable; targets are the answers and their </s>", () => {
  const tok = new FixtureTokenizer();
  tok.template = jinjaTemplate(ZEPHYR_TEMPLATE);
  const messages: ChatMessage[] = [
    { role: "system", content: "You are a friendly bot." },
    { role: "user", content: "Who is Lily?" },
    { role: "assistant", content: "A little girl." },
    { role: "user", content: "What does she like?" },
    { role: "assistant", content: "She likes to play in the park." },
  ];
  const full = tok.applyChatTemplate(messages, { addGenerationPrompt: false });
  assert.ok(full.startsWith("<|system|>\nYou are a friendly bot.</s>\n<|user|>"), JSON.stringify(full));
  const stats = newTokenizeStats();
  const seq = tokenizeChat(tok, { kind: "chat", messages, source: src }, {}, stats);
  assert.equal(seq.ids[0], 1, "BOS added: Zephyr's template has no bos_token");
  assert.deepEqual(seq.ids.slice(1), tok.encode(full, { addSpecialTokens: false }));
  // Jinja keeps the newline after {{ '<|assistant|>' }}, so the generation prompt is "<|assistant|>\n" and the
  // targets are each answer plus the "</s>\n" that closes it.
  assert.equal(
    tok.decode(masked(seq.ids, seq.mask)),
    "A little girl.</s> \nShe likes to play in the park.</s> \n",
  );
  assert.equal(stats.boundaryMerges, 0);
});
