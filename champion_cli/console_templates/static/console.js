// Keyboard shortcuts on the review page: 1-9 choose a label, s skips, n types a new intent.
document.addEventListener("keydown", (event) => {
  const form = document.getElementById("answer");
  if (!form || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement) return;  // typing a new intent
  if (/^[1-9]$/.test(event.key)) {
    const button = form.querySelector(`button[data-key="${event.key}"]`);
    if (button) { event.preventDefault(); form.requestSubmit(button); }
  } else if (event.key === "s") {
    event.preventDefault(); form.requestSubmit(document.getElementById("skip"));
  } else if (event.key === "n") {
    event.preventDefault(); document.getElementById("new-label").focus();
  }
});
