/**
 * Errors that Distillery reports to its users.
 *
 * A {@linkcode UserError} is a problem with what the user gave us (a recipe, a file, a flag, a model directory):
 * the CLI prints its message without a stack trace and exits with code 2. Anything else is a bug in Distillery
 * and keeps its stack trace.
 *
 * @module
 */

/** Exit code for problems with the user's input (recipes, files, flags). */
export const USER_ERROR_EXIT_CODE = 2;

/** A problem with the user's input. The message names the file, field or stage and what was expected. */
export class UserError extends Error {
  /** Process exit code the CLI uses for this error. */
  readonly exitCode: number = USER_ERROR_EXIT_CODE;

  /** Creates a user error; `options.cause` keeps the underlying error for debugging. */
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "UserError";
  }
}

/** True when `e` is a {@linkcode UserError} (also across module copies, by name). */
export function isUserError(e: unknown): e is UserError {
  return e instanceof UserError || (e instanceof Error && e.name === "UserError");
}
