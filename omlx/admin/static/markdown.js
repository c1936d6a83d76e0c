// A small Markdown renderer for chat replies: fenced and inline code, headings, bold,
// italics, links (http/https only), lists, quotes and paragraphs.  Everything is escaped
// first, so model output can never inject markup or script.
"use strict";

window.renderMarkdown = (function () {
  function escape(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(text) {
    const codes = [];
    text = text.replace(/`([^`\n]+)`/g, (_, code) => { codes.push(code); return "\u0000" + (codes.length - 1) + "\u0000"; });
    text = escape(text)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
    return text.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + escape(codes[+i]) + "</code>");
  }

  return function render(source) {
    const lines = source.replace(/\r\n/g, "\n").split("\n");
    const out = [];
    let paragraph = [];
    let list = null;  // "ul" or "ol"

    function flushParagraph() {
      if (paragraph.length) out.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    }
    function closeList() {
      if (list) out.push("</" + list + ">");
      list = null;
    }

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushParagraph(); closeList();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        const lang = fence[1] ? ' class="language-' + escape(fence[1]) + '"' : "";
        out.push("<pre><code" + lang + ">" + escape(code.join("\n")) + "</code></pre>");
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      const quote = line.match(/^>\s?(.*)$/);
      if (heading) {
        flushParagraph(); closeList();
        const level = heading[1].length;
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushParagraph();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline((bullet || numbered)[1]) + "</li>");
      } else if (quote) {
        flushParagraph(); closeList();
        out.push("<blockquote>" + inline(quote[1]) + "</blockquote>");
      } else if (!line.trim()) {
        flushParagraph(); closeList();
      } else {
        closeList();
        paragraph.push(line);
      }
    }
    flushParagraph(); closeList();
    return out.join("\n");
  };
})();
