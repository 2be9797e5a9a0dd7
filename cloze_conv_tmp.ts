import { loadReferenceModel } from "./tests/reference/fixtures.ts";
import { refForward, logProbAt } from "./tests/reference/model_f64.ts";
import { Tokenizer } from "./models/tokenizer.ts";
const { cfg, w } = await loadReferenceModel("llama");
const tok = await Tokenizer.fromDir("fixtures/models/stories260K-hf");
const items = Deno.readTextFileSync("fixtures/eval/tinystories_cloze.jsonl").trim().split("\n").map((l) => JSON.parse(l));
const bos = Deno.args[0] === "bos";
const res: number[][] = [];
let n = 0;
const acc = { raw: 0, chars: 0, charsSp: 0, tokens: 0, bytes: 0 };
for (const it of items) {
  const ctxIds = tok.encode(it.ctx, { addSpecialTokens: false });
  const lls: number[] = [], ntok: number[] = [];
  for (const e of it.endings) {
    const whole = tok.encode(it.ctx + " " + e, { addSpecialTokens: false });
    const cont = whole.slice(ctxIds.length);
    const ids = bos ? [1, ...whole] : whole;
    const off = bos ? 1 : 0;
    const out = refForward(cfg, w, ids);
    let ll = 0;
    for (let j = 0; j < cont.length; j++) { const pos = off + ctxIds.length + j; ll += logProbAt(out.logits, pos - 1, cfg.V, ids[pos]); }
    lls.push(ll); ntok.push(cont.length);
  }
  const am = (f: (i: number) => number) => { let b = 0; for (let i = 1; i < lls.length; i++) if (f(i) > f(b)) b = i; return b; };
  if (am((i) => lls[i]) === it.label) acc.raw++;
  if (am((i) => lls[i] / it.endings[i].length) === it.label) acc.chars++;
  if (am((i) => lls[i] / (it.endings[i].length + 1)) === it.label) acc.charsSp++;
  if (am((i) => lls[i] / ntok[i]) === it.label) acc.tokens++;
  if (am((i) => lls[i] / new TextEncoder().encode(it.endings[i]).length) === it.label) acc.bytes++;
  n++;
  if (n === 400 || n === 800 || n === items.length) console.log(bos ? "bos" : "nobos", n, JSON.stringify(Object.fromEntries(Object.entries(acc).map(([k, v]) => [k, +(v / n).toFixed(4)]))));
}
