/**
 * lm-eval's multiple-choice conventions: request encoding (whole-string tail, whitespace moved to the
 * continuation, empty contexts, truncation), few-shot contexts and selection, accuracy metrics and stderr.
 */
import assert from "node:assert/strict";
import type { TextTokenizer } from "../../data/tokenizer.ts";
import type { MultipleChoiceExample } from "../../data/formats.ts";
import { Tokenizer } from "../../models/tokenizer.ts";
import { isUserError } from "../../util/errors.ts";
import {
  buildContext,
  choiceMetrics,
  encodeRequest,
  meanStderr,
  scoreItem,
  selectFewshot,
} from "../../stages/shared/multiple_choice.ts";
import { TEACHER_DIR } from "./recipe_run.ts";

/** Characters as tokens, except "ab" which merges: shows why the whole string is encoded, not the pieces. */
function charTokenizer(bos: number | null = 1): TextTokenizer {
  const enc = (s: string) => {
    const out: number[] = [];
    for (let i = 0; i < s.length; i++) {
      if (s[i] === "a" && s[i + 1] === "b") {
        out.push(1000);
        i++;
      } else out.push(s.charCodeAt(i));
    }
    return out;
  };
  return {
    encode: (s, o) => (o?.addSpecialTokens === false || bos === null ? enc(s) : [bos, ...enc(s)]),
    decode: (ids) => ids.map((i) => (i === 1000 ? "ab" : String.fromCharCode(i))).join(""),
    bosId: bos,
    eosId: 2,
    applyChatTemplate: () => "",
  };
}

const item = (context: string, choices: string[], label: number): MultipleChoiceExample => ({
  kind: "multiple_choice",
  context,
  choices,
  label,
  source: { file: "t.jsonl", index: 0, line: 1 },
});

Deno.test("encodeRequest: the continuation is the tail of the whole string's encoding", () => {
  const tok = charTokenizer();
  const code = (s: string) => [...s].map((c) => c.charCodeAt(0));
  // "xa" + "bc" encodes whole as x, ab, c: the continuation is what follows the context's own 2 tokens (x, a),
  // as lm-eval does, even where a merge crosses the boundary
  const r = encodeRequest(tok, "xa", ["bc", "cd"], { maxLength: 100, where: "t" });
  assert.deepEqual(r.context, code("xa"));
  assert.deepEqual(r.continuations, [code("c"), code("cd")]);
  // trailing whitespace of the context moves to the continuation
  const w = encodeRequest(tok, "q: ", ["yes"], { maxLength: 100, where: "t" });
  assert.deepEqual(w.context, code("q:"));
  assert.deepEqual(w.continuations, [code(" yes")]);
  // add_bos_token puts BOS before the context only
  const b = encodeRequest(tok, "q", [" a"], { maxLength: 100, where: "t", addBos: true });
  assert.deepEqual(b.context, [1, ...code("q")]);
  // an empty context becomes BOS (else EOS)
  assert.deepEqual(encodeRequest(tok, "", ["z"], { maxLength: 100, where: "t" }).context, [1]);
  assert.deepEqual(encodeRequest(charTokenizer(null), "", ["z"], { maxLength: 100, where: "t" }).context, [
    2,
  ]);
});

Deno.test("encodeRequest: long requests keep the context's end; impossible ones are refused", () => {
  const tok = charTokenizer();
  const r = encodeRequest(tok, "0123456789", [" x", " xyz"], { maxLength: 8, where: "t" });
  // longest request: context + 4 continuation tokens <= 9 tokens, so 5 context tokens are kept
  assert.deepEqual(String.fromCharCode(...r.context), "56789");
  assert.throws(
    () => encodeRequest(tok, "c", [" " + "y".repeat(20)], { maxLength: 8, where: "item 3" }),
    (e: Error) => isUserError(e) && e.message.includes("item 3") && e.message.includes("max_length 8"),
  );
  assert.throws(
    () => encodeRequest(tok, "c", [""], { maxLength: 8, where: "item 4" }),
    (e: Error) => isUserError(e) && e.message.includes("item 4") && e.message.includes("no tokens"),
  );
});

Deno.test("encodeRequest: with the fixture's SentencePiece tokenizer, ' ' + choice starts with a ▁ piece", async () => {
  const tok = await Tokenizer.fromDir(TEACHER_DIR);
  const ctx = "The cat sat on the mat.";
  const r = encodeRequest(tok, ctx, [" It was happy."], { maxLength: 512, where: "t" });
  assert.deepEqual(r.context, tok.encode(ctx, { addSpecialTokens: false }));
  // the space becomes the first piece's "▁" (the 512-token vocabulary splits "It" as "▁I", "t")
  assert.deepEqual(tok.tokens(r.continuations[0]).slice(0, 2), ["▁I", "t"]);
  assert.equal(tok.decode([...r.context, ...r.continuations[0]]), ctx + " It was happy.");
});

Deno.test("buildContext and selectFewshot: description, solved examples, the item last; reproducible", () => {
  const pool = [0, 1, 2, 3, 4].map((i) => item(`c${i}`, [`a${i}`, `b${i}`], i % 2));
  const fmt = { description: "D\n", targetDelimiter: " ", fewshotDelimiter: "\n\n" };
  const shots = selectFewshot(pool, 2, "s/task", 3, true);
  assert.equal(shots.length, 2);
  assert.ok(!shots.includes(pool[3]), "never the item itself");
  assert.deepEqual(selectFewshot(pool, 2, "s/task", 3, true), shots, "same seed and item, same examples");
  const ctx = buildContext(pool[3], shots, fmt);
  assert.equal(ctx, `D\n${shots.map((s) => `${s.context} ${s.choices[s.label]}\n\n`).join("")}c3`);
  assert.equal(buildContext(pool[3], [], fmt), "D\nc3");
  assert.deepEqual(selectFewshot(pool, 0, "s", 0, true), []);
  assert.throws(() => selectFewshot(pool, 5, "s", 0, true), (e: Error) => isUserError(e));
  assert.equal(selectFewshot(pool, 5, "s", 0, false).length, 5, "a separate pool may use all of it");
});

Deno.test("scoreItem and choiceMetrics: acc, acc_norm by characters, first index on ties, stderr", () => {
  const it = item("c", ["aaaa", "b", "cc"], 0);
  // raw: choice 1 wins; per character: -4/4 = -1 beats -2/1 and -3/2
  const o = scoreItem(it, [-4, -2, -3]);
  assert.deepEqual(o, { pred: 1, predNorm: 0, acc: 0, accNorm: 1 });
  assert.equal(scoreItem(item("c", ["x", "y"], 1), [-1, -1]).pred, 0, "ties go to the first");
  // code points, not UTF-16 units: "é" is one character, "😀" one (two UTF-16 units)
  assert.equal(scoreItem(item("c", ["😀", "ab"], 0), [-1.5, -2.9]).predNorm, 1);
  const m = choiceMetrics([o, o, scoreItem(it, [-1, -5, -5])]);
  assert.equal(m["acc,none"], 1 / 3);
  assert.equal(m["acc_norm,none"], 1);
  assert.equal(m["acc_norm_stderr,none"], 0);
  // sample std (n - 1) / sqrt(n): values 0, 0, 1 -> std sqrt(1/3), stderr sqrt(1/3)/sqrt(3) = 1/3
  assert.ok(Math.abs(m["acc_stderr,none"]! - 1 / 3) < 1e-15);
  assert.equal(meanStderr([1]), null);
});
