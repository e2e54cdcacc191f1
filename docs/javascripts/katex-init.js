// Render the math that pymdownx.arithmatex (generic mode) leaves in `.arithmatex` elements,
// with the KaTeX copy shipped in docs/javascripts/katex/ (no CDN).
// Arithmatex wraps inline math in \( ... \) and display math in \[ ... \].
(function () {
  function renderMath() {
    if (typeof renderMathInElement !== "function") {
      return;
    }
    var elements = document.querySelectorAll(".arithmatex");
    for (var i = 0; i < elements.length; i++) {
      renderMathInElement(elements[i], {
        delimiters: [
          { left: "$$", right: "$$", display: true },
          { left: "$", right: "$", display: false },
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true },
        ],
        throwOnError: false,
      });
    }
  }

  if (typeof document$ !== "undefined" && typeof document$.subscribe === "function") {
    // mkdocs-material: runs on the first load and after every instant-navigation page swap
    document$.subscribe(renderMath);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", renderMath);
  } else {
    renderMath();
  }
})();
