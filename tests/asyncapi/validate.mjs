// Validate an AsyncAPI document with the AsyncAPI parser (the validator behind `asyncapi
// validate`): the schema of the specification, its rules, and every payload schema.
// Usage: node validate.mjs FILE. Prints one JSON line {version, channels, operations,
// messages, errors, warnings}; exits 1 if the parser reported an error.
import { readFileSync } from "node:fs";
import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

const file = process.argv[2];
if (!file) {
  throw new Error("usage: node validate.mjs FILE");
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"), {
  source: file,
});
const describe = (d) => ({ code: d.code, message: d.message, path: d.path.join("/") });
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).map(describe);
const warnings = diagnostics.filter((d) => d.severity !== DiagnosticSeverity.Error).map(describe);
const summary = { errors, warnings };
if (document) {
  summary.version = document.version();
  summary.channels = document.channels().all().map((c) => c.id());
  summary.operations = document.operations().all().map((o) => ({
    id: o.id(),
    action: o.action(),
    messages: o.messages().all().map((m) => m.name() ?? m.id()),
    replies: o.reply()?.messages().all().map((m) => m.name() ?? m.id()) ?? [],
  }));
  summary.messages = document.allMessages().all().map((m) => m.name() ?? m.id());
}
process.stdout.write(`${JSON.stringify(summary)}\n`);
process.exit(errors.length ? 1 : 0);
