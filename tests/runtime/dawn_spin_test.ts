// Pacing of Dawn's native setImmediate polls (runtime/dawn_spin.ts): a long streak of native callbacks is slowed
// down to a few hundred polls, JavaScript callbacks pass untouched, and results still arrive.
import assert from "node:assert/strict";
import { dawnSpinStats, installDawnSpinPacing } from "../../runtime/dawn_spin.ts";

/** Polls `callback` through setImmediate until `ms` have passed; returns how many polls ran, and when. */
function spin(
  callback: (done: () => boolean) => () => void,
  ms: number,
): Promise<{ polls: number; elapsed: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    let n = 0;
    const done = () => {
      n++;
      const elapsed = performance.now() - t0;
      if (elapsed >= ms) {
        resolve({ polls: n, elapsed });
        return true;
      }
      return false;
    };
    setImmediate(callback(done));
  });
}

Deno.test("dawn_spin: native poll streaks are paced, JavaScript callbacks are not", async () => {
  assert.ok(installDawnSpinPacing(), "no setImmediate to wrap");
  assert.ok(installDawnSpinPacing(), "a second install is a no-op");
  // A bound function prints as native code, like the functions Dawn's binding creates for its polls.
  const native = (done: () => boolean) => {
    const tick = function (this: unknown) {
      if (!done()) setImmediate(bound);
    };
    const bound = tick.bind(null);
    return bound;
  };
  const before = { ...dawnSpinStats };
  const { polls, elapsed } = await spin(native, 40);
  assert.equal(dawnSpinStats.polls - before.polls, polls, "every native poll is counted");
  assert.ok(dawnSpinStats.paced > before.paced, "a 40 ms streak was never paced");
  // unpaced, 40 ms is tens of thousands of polls; paced, about 100 free ones plus 20 per doubling of age
  assert.ok(polls < 2000, `${polls} native polls in 40 ms`);
  // the poll that sees the end comes at most 5% of the streak's age (or 1 ms) late; generous for a busy CI
  assert.ok(elapsed < 40 * 1.5 + 5, `a 40 ms wait ended after ${elapsed.toFixed(1)} ms`);
  assert.ok(dawnSpinStats.sleptMs > before.sleptMs);

  const mid = { ...dawnSpinStats };
  const js = (done: () => boolean) => {
    const tick = () => {
      if (!done()) setImmediate(tick);
    };
    return tick;
  };
  const { polls: jsPolls } = await spin(js, 20);
  assert.equal(dawnSpinStats.polls, mid.polls, "JavaScript callbacks counted as native polls");
  assert.ok(jsPolls > 2000, `only ${jsPolls} JavaScript immediates in 20 ms: were they paced?`);
});
