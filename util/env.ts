/**
 * Reading environment variables where the permission may be missing: a library call made without
 * `--allow-env` should behave as if the variable were unset, not throw.
 *
 * @module
 */

/** The value of `name`, or undefined when it is unset, empty, or the environment may not be read. */
export function readEnv(name: string): string | undefined {
  try {
    const v = Deno.env.get(name);
    return v === "" ? undefined : v;
  } catch {
    return undefined; // no --allow-env: behave as if unset
  }
}
