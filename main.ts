/** The Distillery command-line interface. */
if (import.meta.main) {
  console.error("distillery: the command-line interface is not built yet");
  Deno.exit(2);
}
