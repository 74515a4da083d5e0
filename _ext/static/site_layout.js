// Labels each cell of a table that has a header row with its column's name and marks the table,
// so that site_layout.css can show it one row at a time on a phone. See _ext/site_layout.py.
document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("article table.table")) {
    const header = table.tHead && table.tHead.rows[0];
    if (!header) continue;
    const names = [...header.cells].map((cell) => cell.textContent.trim());
    for (const body of table.tBodies) {
      for (const row of body.rows) {
        [...row.cells].forEach((cell, index) => {
          if (names[index]) cell.dataset.label = names[index];
        });
      }
    }
    table.classList.add("nl-stack");
  }
});
