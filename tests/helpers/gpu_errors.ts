/**
 * Fails a test on WebGPU validation errors. An invalid dispatch (e.g. one buffer bound both read-only and
 * writable) is dropped by the implementation with only an uncaptured-error event, so a test could otherwise read
 * stale pool memory and pass or fail for the wrong reason.
 *
 * @module
 */
import type { Runtime } from "../../runtime/runtime.ts";

/** Runs `fn` inside a validation error scope and throws the first validation error it caused. */
export async function noGpuErrors<T>(rt: Runtime, fn: () => Promise<T>): Promise<T> {
  rt.dev.gpu.pushErrorScope("validation");
  let result: T;
  try {
    result = await fn();
  } catch (e) {
    await rt.dev.gpu.popErrorScope();
    throw e;
  }
  const err = await rt.dev.gpu.popErrorScope();
  if (err) throw new Error(`GPU validation error: ${err.message}`);
  return result;
}
